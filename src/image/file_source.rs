//! A layer file whose bytes are read while the layer is written, never held whole: a big file on
//! disk, or a member of a package archive (the 155 MB workerd binary in its npm tarball). The
//! layer writer opens it, streams exactly `size` bytes into the tar stream, and lets it go.

use std::fmt;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

type Opener = dyn Fn() -> io::Result<Box<dyn Read + Send>> + Send + Sync;

/// Where a streamed file's bytes come from, and how many there are.
#[derive(Clone)]
pub struct FileSource {
    /// For messages and equality: the file, or the archive and member.
    what: String,
    size: u64,
    open: Arc<Opener>,
}

impl FileSource {
    /// `open` must give the same `size` bytes every time it is called.
    pub fn new(
        what: impl Into<String>,
        size: u64,
        open: impl Fn() -> io::Result<Box<dyn Read + Send>> + Send + Sync + 'static,
    ) -> Self {
        FileSource { what: what.into(), size, open: Arc::new(open) }
    }

    /// A file on disk of `size` bytes.
    pub fn path(path: PathBuf, size: u64) -> Self {
        let what = path.display().to_string();
        FileSource::new(what, size, move || {
            let file = std::fs::File::open(&path)?;
            Ok(Box::new(file) as Box<dyn Read + Send>)
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// A reader of exactly [`size`](Self::size) bytes: a source that ends early is an error (the
    /// tar header already announced the size), and bytes beyond it are not read.
    pub fn open(&self) -> io::Result<ExactReader> {
        let inner = (self.open)().map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.what)))?;
        Ok(ExactReader { inner, remaining: self.size, what: self.what.clone() })
    }
}

impl PartialEq for FileSource {
    fn eq(&self, other: &Self) -> bool {
        self.what == other.what && self.size == other.size && Arc::ptr_eq(&self.open, &other.open)
    }
}

impl Eq for FileSource {}

impl fmt::Debug for FileSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileSource({}, {} bytes)", self.what, self.size)
    }
}

pub struct ExactReader {
    inner: Box<dyn Read + Send>,
    remaining: u64,
    what: String,
}

impl Read for ExactReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ended {} bytes early (did it change while the layer was written?)",
                    self.what, self.remaining
                ),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exactly_the_announced_size() {
        let long = FileSource::new("long", 3, || Ok(Box::new(&b"abcdef"[..]) as Box<dyn Read + Send>));
        let mut out = Vec::new();
        long.open().unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc");
        let short = FileSource::new("short", 9, || Ok(Box::new(&b"abc"[..]) as Box<dyn Read + Send>));
        let error = short.open().unwrap().read_to_end(&mut Vec::new()).unwrap_err();
        assert!(error.to_string().contains("short ended 6 bytes early"), "{error}");
    }
}
