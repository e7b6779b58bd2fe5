//! Reading package archives: npm tarballs (gzipped tar) and Debian packages (`ar` with a
//! compressed `data.tar`).

use std::io::Read;

use crate::image::layer::LayerBuilder;

/// Calls `visit` with each entry of a tar stream, paths normalised (no leading `./` or `/`).
pub fn for_each_tar_entry(
    reader: impl Read,
    mut visit: impl FnMut(&str, &mut tar::Entry<'_, &mut dyn Read>) -> Result<(), String>,
) -> Result<(), String> {
    let mut boxed: Box<dyn Read> = Box::new(reader);
    let reader: &mut dyn Read = &mut boxed;
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(|e| format!("not a tar archive: {e}"))? {
        let mut entry = entry.map_err(|e| format!("corrupt tar entry: {e}"))?;
        let raw = entry.path().map_err(|e| format!("bad path in tar: {e}"))?.to_string_lossy().into_owned();
        let path = raw.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/').to_owned();
        if path.is_empty() || path == "." {
            continue;
        }
        visit(&path, &mut entry)?;
    }
    Ok(())
}

/// The position of `member`'s data in the (decompressed) tar stream and its size, found without
/// reading the data into memory.
pub fn locate_tar_member(reader: impl Read, member: &str) -> Result<Option<(u64, u64)>, String> {
    let mut found = None;
    for_each_tar_entry(reader, |path, entry| {
        if path == member && found.is_none() {
            if entry.header().entry_type() != tar::EntryType::Regular {
                return Err(format!("{path} is not a regular file"));
            }
            found = Some((entry.raw_file_position(), entry.size()));
        }
        Ok(())
    })?;
    Ok(found)
}

/// The `data.tar.*` member of a Debian package, decompressed.
pub fn deb_data(deb: &[u8]) -> Result<Vec<u8>, String> {
    let mut archive = ar::Archive::new(deb);
    while let Some(member) = archive.next_entry() {
        let mut member = member.map_err(|e| format!("not a Debian package (ar): {e}"))?;
        let name = String::from_utf8_lossy(member.header().identifier()).into_owned();
        if !name.starts_with("data.tar") {
            continue;
        }
        let mut compressed = Vec::new();
        member.read_to_end(&mut compressed).map_err(|e| format!("cannot read {name}: {e}"))?;
        let mut data = Vec::new();
        let result = match name.as_str() {
            "data.tar.xz" => xz2::read::XzDecoder::new(compressed.as_slice()).read_to_end(&mut data),
            "data.tar.gz" => flate2::read::GzDecoder::new(compressed.as_slice()).read_to_end(&mut data),
            "data.tar" => {
                data = compressed;
                Ok(0)
            }
            other => {
                return Err(format!(
                    "{other} is compressed in a way this tool does not read (xz and gzip are)"
                ))
            }
        };
        result.map_err(|e| format!("cannot decompress {name}: {e}"))?;
        return Ok(data);
    }
    Err("has no data.tar member".into())
}

/// Copies the entries of a package's data that `include` accepts into `layer`, with the archive's
/// permission bits (the rest of the metadata is the layer writer's fixed values).
pub fn add_tar_entries(
    data: &[u8],
    include: impl Fn(&str) -> bool,
    layer: &mut LayerBuilder,
) -> Result<usize, String> {
    let mut added = 0;
    for_each_tar_entry(data, |path, entry| {
        if !include(path) {
            return Ok(());
        }
        let mode = entry.header().mode().map_err(|e| format!("{path}: {e}"))? & 0o7777;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                layer.dir(path, mode);
            }
            tar::EntryType::Regular => {
                let mut content = Vec::new();
                entry.read_to_end(&mut content).map_err(|e| format!("{path}: {e}"))?;
                layer.file(path, content, mode);
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("{path}: {e}"))?
                    .ok_or_else(|| format!("{path}: symlink without target"))?;
                layer.symlink(path, &target.to_string_lossy());
            }
            other => return Err(format!("{path}: unsupported entry type {other:?}")),
        }
        added += 1;
        Ok(())
    })?;
    Ok(added)
}
