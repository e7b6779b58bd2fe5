//! A worker source that is a directory on disk.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use bytes::Bytes;

use super::SourceError;
use crate::image::file_source::FileSource;
use crate::worker::ModuleContent;

/// Files this big or bigger are not read here but streamed into their layer when it is written,
/// so that a build's memory stays the same whatever the size of its modules. Smaller ones (every
/// module Cloudflare takes: 10 MiB at most) are read at once: their layer is built in memory and
/// pushed from there, with no temporary file on the way.
pub const STREAM_FROM_BYTES: u64 = 16 << 20;

/// Reads every regular file under `root` (recursively) as a module, keyed by its path relative to
/// `root`; big files are only named (see [`STREAM_FROM_BYTES`]). Symbolic links are refused:
/// following them could pull host files into an image.
pub fn read_dir_source(root: &Path) -> Result<BTreeMap<String, ModuleContent>, SourceError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SourceError::Io { path, source }
    };
    let meta = fs::metadata(root).map_err(io(root))?;
    if !meta.is_dir() {
        return Err(SourceError::Invalid { path: root.to_path_buf(), message: "is not a directory".into() });
    }
    let mut files = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io(&path))?;
            let relative = relative_name(root, &path)?;
            if kind.is_symlink() {
                return Err(SourceError::Invalid {
                    path: root.to_path_buf(),
                    message: format!(
                        "{relative:?} is a symbolic link; copy the file into the worker instead"
                    ),
                });
            } else if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let size = entry.metadata().map_err(io(&path))?.len();
                let content = if size >= STREAM_FROM_BYTES {
                    ModuleContent::File(FileSource::path(path, size))
                } else {
                    ModuleContent::Memory(Bytes::from(fs::read(&path).map_err(io(&path))?))
                };
                files.insert(relative, content);
            } else {
                return Err(SourceError::Invalid {
                    path: root.to_path_buf(),
                    message: format!("{relative:?} is not a regular file"),
                });
            }
        }
    }
    Ok(files)
}

fn relative_name(root: &Path, path: &Path) -> Result<String, SourceError> {
    let invalid = |message: String| SourceError::Invalid { path: root.to_path_buf(), message };
    let relative = path
        .strip_prefix(root)
        .map_err(|_| invalid(format!("{} is outside the directory", path.display())))?;
    let parts: Option<Vec<&str>> = relative.components().map(|c| c.as_os_str().to_str()).collect();
    parts
        .map(|p| p.join("/"))
        .ok_or_else(|| invalid(format!("file name {} is not UTF-8", relative.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nested_files_with_relative_names() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("lib/deep")).unwrap();
        fs::write(dir.path().join("index.js"), "a").unwrap();
        fs::write(dir.path().join("lib/deep/x.js"), "b").unwrap();
        let files = read_dir_source(dir.path()).unwrap();
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(names, ["index.js", "lib/deep/x.js"]);
        assert_eq!(files["lib/deep/x.js"], ModuleContent::Memory(Bytes::from_static(b"b")));
    }

    #[test]
    fn big_files_are_named_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'x'; STREAM_FROM_BYTES as usize];
        fs::write(dir.path().join("big.js"), &big).unwrap();
        let files = read_dir_source(dir.path()).unwrap();
        let ModuleContent::File(source) = &files["big.js"] else { panic!("{:?}", files["big.js"]) };
        assert_eq!(source.size(), STREAM_FROM_BYTES);
        assert_eq!(files["big.js"].read_all().unwrap(), big);
    }

    #[test]
    fn refuses_symlinks_and_missing_dirs() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("passwd.txt")).unwrap();
        let err = read_dir_source(dir.path()).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let err = read_dir_source(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("cannot read worker directory"), "{err}");
    }
}
