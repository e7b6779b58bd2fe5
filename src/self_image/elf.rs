//! What an x86-64 ELF executable needs to start: its program interpreter (the dynamic loader) and
//! the shared libraries it names (DT_NEEDED), checked against the files of the runtime layer.
//! Which libraries a Rust binary needs depends on how it was built (liblzma, for one, is linked
//! dynamically when the build machine has its headers), so the image is checked, not assumed.

use std::collections::HashMap;

use crate::image::layer::{Entry, LayerBuilder};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const EM_X86_64: u16 = 62;

/// Where glibc's loader looks for libraries on Debian when there is no /etc/ld.so.cache.
const LIBRARY_DIRS: [&str; 4] = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib"];

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// `PT_INTERP`, e.g. `/lib64/ld-linux-x86-64.so.2`; none for a static binary.
    pub interpreter: Option<String>,
    /// `DT_NEEDED` names, in the binary's order.
    pub libraries: Vec<String>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn to_usize(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}
fn c_string(b: &[u8], at: usize) -> Option<String> {
    let rest = b.get(at..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

struct Segment {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// Reads the interpreter and needed libraries of a little-endian x86-64 ELF executable.
pub fn needs(binary: &[u8]) -> Result<Needs, String> {
    if binary.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("it is not an ELF executable".into());
    }
    if binary.get(4..6) != Some([2u8, 1].as_slice()) || u16_at(binary, 0x12) != Some(EM_X86_64) {
        return Err("it is not a 64-bit little-endian x86-64 executable (the image is linux/amd64)".into());
    }
    let corrupt = || "its ELF headers are truncated or corrupt".to_owned();
    let phoff = u64_at(binary, 0x20).and_then(to_usize).ok_or_else(corrupt)?;
    let phentsize = usize::from(u16_at(binary, 0x36).ok_or_else(corrupt)?);
    let phnum = usize::from(u16_at(binary, 0x38).ok_or_else(corrupt)?);
    let mut segments = Vec::with_capacity(phnum);
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        segments.push(Segment {
            kind: u32_at(binary, at).ok_or_else(corrupt)?,
            offset: u64_at(binary, at + 8).ok_or_else(corrupt)?,
            vaddr: u64_at(binary, at + 16).ok_or_else(corrupt)?,
            filesz: u64_at(binary, at + 32).ok_or_else(corrupt)?,
        });
    }
    let mut found = Needs::default();
    if let Some(interp) = segments.iter().find(|s| s.kind == PT_INTERP) {
        found.interpreter =
            Some(to_usize(interp.offset).and_then(|o| c_string(binary, o)).ok_or_else(corrupt)?);
    }
    let Some(dynamic) = segments.iter().find(|s| s.kind == PT_DYNAMIC) else {
        return Ok(found);
    };
    let (start, len) =
        (to_usize(dynamic.offset).ok_or_else(corrupt)?, to_usize(dynamic.filesz).ok_or_else(corrupt)?);
    let mut needed = Vec::new();
    let mut strtab = None;
    for at in (start..start + len).step_by(16) {
        let (tag, value) =
            (u64_at(binary, at).ok_or_else(corrupt)?, u64_at(binary, at + 8).ok_or_else(corrupt)?);
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed.push(value),
            DT_STRTAB => strtab = Some(value),
            _ => {}
        }
    }
    if needed.is_empty() {
        return Ok(found);
    }
    // DT_STRTAB is an address: find the loaded segment that holds it to get its file offset.
    let strtab = strtab.ok_or_else(corrupt)?;
    let load = segments
        .iter()
        .find(|s| s.kind == PT_LOAD && s.vaddr <= strtab && strtab < s.vaddr + s.filesz)
        .ok_or_else(corrupt)?;
    let strtab_offset = load.offset + (strtab - load.vaddr);
    for name in needed {
        let at = strtab_offset.checked_add(name).and_then(to_usize).ok_or_else(corrupt)?;
        found.libraries.push(c_string(binary, at).ok_or_else(corrupt)?);
    }
    Ok(found)
}

/// Follows symlinks (absolute, or relative to their directory) to a regular file of the layer.
fn resolves_to_file(entries: &HashMap<&str, &Entry>, path: &str) -> bool {
    let mut path = path.trim_start_matches('/').to_owned();
    for _ in 0..16 {
        match entries.get(path.as_str()) {
            Some(Entry::File { .. }) => return true,
            Some(Entry::Symlink { target }) => {
                path = match target.strip_prefix('/') {
                    Some(absolute) => absolute.to_owned(),
                    None => match path.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{target}"),
                        None => target.clone(),
                    },
                };
            }
            _ => return false,
        }
    }
    false
}

/// Checks that the layer holds the binary's interpreter and every library it needs.
pub fn check_runs_on(binary: &[u8], layer: &LayerBuilder) -> Result<(), String> {
    let needs = needs(binary)?;
    let entries: HashMap<&str, &Entry> = layer.entries().collect();
    let mut missing = Vec::new();
    if let Some(interpreter) = &needs.interpreter {
        if !resolves_to_file(&entries, interpreter) {
            missing.push(interpreter.clone());
        }
    }
    for library in &needs.libraries {
        if !LIBRARY_DIRS.iter().any(|dir| resolves_to_file(&entries, &format!("{dir}/{library}"))) {
            missing.push(library.clone());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "it needs {}, which no package of the recipe provides (add the Debian package that ships it to base-images/controller/recipe.json)",
        missing.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test executable itself is a dynamically linked glibc binary, like workerbundle.
    fn this_binary() -> Vec<u8> {
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    #[test]
    fn reads_the_loader_and_libraries_of_a_real_executable() {
        let needs = needs(&this_binary()).unwrap();
        assert_eq!(needs.interpreter.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert!(needs.libraries.iter().any(|l| l == "libc.so.6"), "{needs:?}");
    }

    #[test]
    fn refuses_what_is_not_an_amd64_elf() {
        assert!(needs(b"#!/bin/sh\necho hi\n").unwrap_err().contains("not an ELF"));
        let mut other = this_binary()[..64].to_vec();
        other[0x12] = 183; // aarch64
        assert!(needs(&other).unwrap_err().contains("x86-64"));
    }

    #[test]
    fn names_what_the_layer_lacks_and_follows_symlinks() {
        let binary = this_binary();
        let needs = needs(&binary).unwrap();
        let mut layer = LayerBuilder::new();
        let message = check_runs_on(&binary, &layer).unwrap_err();
        assert!(message.contains("libc.so.6") && message.contains("ld-linux-x86-64.so.2"), "{message}");

        layer.symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2");
        layer.file("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "x", 0o755);
        for library in &needs.libraries {
            layer.symlink(&format!("lib/x86_64-linux-gnu/{library}"), &format!("{library}.real"));
            layer.file(&format!("lib/x86_64-linux-gnu/{library}.real"), "x", 0o644);
        }
        check_runs_on(&binary, &layer).unwrap();

        layer.symlink("lib64/ld-linux-x86-64.so.2", "/lib/nowhere");
        assert!(check_runs_on(&binary, &layer).unwrap_err().contains("ld-linux"));
    }
}
