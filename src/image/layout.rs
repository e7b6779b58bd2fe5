//! OCI image layouts on disk: reading an image (the base) and writing one (the output).
//!
//! Writing is all-or-nothing: a new layout is built in a hidden sibling directory and renamed into
//! place at the end; in an existing layout, blobs (content-addressed, so harmless) are written
//! first and `index.json` is replaced atomically last. A failed build leaves no new tag behind.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType, ANNOTATION_REF_NAME};

use super::block_cache::BlockCache;
use super::canonical::to_canonical_json;
use super::layer::{LayerBuilder, LayerDigests};
use crate::digest::{Digest, HashingWriter};
use crate::oci::{descriptor_digest, linux_amd64, ImageMetadata};

const OCI_LAYOUT_FILE: &str = "oci-layout";
const OCI_LAYOUT_CONTENT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// Manifests, configs and indexes larger than this are refused rather than read into memory.
const MAX_JSON_BLOB: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("OCI layout {dir}: cannot read {what}: {source}")]
    Read { dir: PathBuf, what: String, source: io::Error },
    #[error("OCI layout {dir}: cannot write {what}: {source}")]
    Write { dir: PathBuf, what: String, source: io::Error },
    #[error("OCI layout {dir}: {message}")]
    Invalid { dir: PathBuf, message: String },
    #[error("cannot create the OCI layout directory {dir}: {file} is a file, not a directory")]
    NotADirectory { dir: PathBuf, file: PathBuf },
}

/// A readable OCI image layout.
#[derive(Clone, Debug)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    pub fn open(dir: &Path) -> Result<Self, LayoutError> {
        let layout = Layout { dir: dir.to_path_buf() };
        let marker =
            fs::read(dir.join(OCI_LAYOUT_FILE)).map_err(|source| layout.read_err("oci-layout", source))?;
        let version: serde_json::Value = serde_json::from_slice(&marker)
            .map_err(|e| layout.invalid(format!("oci-layout is not JSON: {e}")))?;
        if version.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            return Err(layout.invalid(format!("unsupported oci-layout {version}")));
        }
        Ok(layout)
    }

    /// Opens the layout at `dir`, making an empty one first where there is none (a target that
    /// gains blobs one at a time, as the controller writes worker layers before any image).
    pub fn open_or_create(dir: &Path) -> Result<Self, LayoutError> {
        if dir.join(OCI_LAYOUT_FILE).exists() {
            return Layout::open(dir);
        }
        let write_err =
            |what: &str, source| LayoutError::Write { dir: dir.to_path_buf(), what: what.into(), source };
        fs::create_dir_all(dir.join("blobs/sha256")).map_err(|e| write_err("blobs directory", e))?;
        let empty =
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        if !dir.join("index.json").exists() {
            write_atomically(&dir.join("index.json"), empty).map_err(|e| write_err("index.json", e))?;
        }
        write_atomically(&dir.join(OCI_LAYOUT_FILE), OCI_LAYOUT_CONTENT)
            .map_err(|e| write_err("oci-layout", e))?;
        Layout::open(dir)
    }

    /// Deletes an image by manifest digest: its tags and its manifest blob (layers and configs
    /// stay; another image may share them). Returns whether it was there.
    pub fn delete_image(&self, digest: &Digest) -> Result<bool, LayoutError> {
        let mut index = self.index()?;
        let before = index.manifests().len();
        let kept: Vec<Descriptor> =
            index.manifests().iter().filter(|d| d.digest().to_string() != digest.as_str()).cloned().collect();
        let untagged = kept.len() != before;
        if untagged {
            index.set_manifests(kept);
            let bytes = to_canonical_json(&index).map_err(|e| LayoutError::Write {
                dir: self.dir.clone(),
                what: "index.json".into(),
                source: e.into(),
            })?;
            write_atomically(&self.dir.join("index.json"), &bytes).map_err(|source| LayoutError::Write {
                dir: self.dir.clone(),
                what: "index.json".into(),
                source,
            })?;
        }
        let blob = self.blob_path(digest);
        let existed = blob.exists();
        if existed {
            fs::remove_file(&blob).map_err(|source| LayoutError::Write {
                dir: self.dir.clone(),
                what: format!("blob {digest}"),
                source,
            })?;
        }
        Ok(untagged || existed)
    }

    /// A manifest and its config, by manifest digest (an image need not be tagged).
    pub fn image_by_digest(&self, digest: &Digest) -> Result<ImageMetadata, LayoutError> {
        let bytes =
            fs::read(self.blob_path(digest)).map_err(|e| self.read_err(&format!("manifest {digest}"), e))?;
        if Digest::of(&bytes) != *digest {
            return Err(self.invalid(format!("manifest {digest} does not match its digest")));
        }
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| self.invalid(format!("manifest {digest}: {e}")))?;
        let config_bytes = self.read_blob(manifest.config())?;
        let config = serde_json::from_slice(&config_bytes)
            .map_err(|e| self.invalid(format!("config of {digest}: {e}")))?;
        Ok(ImageMetadata { manifest_digest: digest.clone(), manifest, config })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    pub fn index(&self) -> Result<ImageIndex, LayoutError> {
        let bytes =
            fs::read(self.dir.join("index.json")).map_err(|source| self.read_err("index.json", source))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| self.invalid(format!("index.json is not an OCI image index: {e}")))
    }

    /// Reads a blob fully and checks it against its digest and size.
    pub fn read_blob(&self, descriptor: &Descriptor) -> Result<Vec<u8>, LayoutError> {
        let digest = descriptor_digest(descriptor).map_err(|m| self.invalid(m))?;
        if descriptor.size() > MAX_JSON_BLOB {
            return Err(self.invalid(format!(
                "blob {digest} is {} bytes, over the limit for metadata",
                descriptor.size()
            )));
        }
        let bytes = fs::read(self.blob_path(&digest))
            .map_err(|source| self.read_err(&format!("blob {digest}"), source))?;
        if Digest::of(&bytes) != digest || bytes.len() as u64 != descriptor.size() {
            return Err(
                self.invalid(format!("blob {digest} does not match its digest or size (corrupt layout?)"))
            );
        }
        Ok(bytes)
    }

    /// The image tagged `tag`, or the only image when no tag is given. An image index (several
    /// platforms) resolves to its linux/amd64 manifest.
    pub fn image(&self, tag: Option<&str>) -> Result<ImageMetadata, LayoutError> {
        let index = self.index()?;
        let tags: Vec<&str> = index
            .manifests()
            .iter()
            .filter_map(|d| d.annotations().as_ref()?.get(ANNOTATION_REF_NAME).map(String::as_str))
            .collect();
        let chosen = match tag {
            Some(tag) => index.manifests().iter().find(|d| {
                d.annotations().as_ref().and_then(|a| a.get(ANNOTATION_REF_NAME)).map(String::as_str)
                    == Some(tag)
            }),
            None if index.manifests().len() == 1 => index.manifests().first(),
            None => {
                return Err(self.invalid(format!(
                    "holds {} images; name one with oci:DIR:TAG (tags: {})",
                    index.manifests().len(),
                    tags.join(", ")
                )))
            }
        };
        let descriptor = chosen.ok_or_else(|| {
            self.invalid(format!(
                "has no image tagged {:?} (tags: {})",
                tag.unwrap_or_default(),
                tags.join(", ")
            ))
        })?;
        let descriptor = self.platform_manifest(descriptor.clone())?;
        let manifest_bytes = self.read_blob(&descriptor)?;
        let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes).map_err(|e| {
            self.invalid(format!("manifest {} is not an OCI image manifest: {e}", descriptor.digest()))
        })?;
        let config_bytes = self.read_blob(manifest.config())?;
        let config = serde_json::from_slice(&config_bytes).map_err(|e| {
            self.invalid(format!("image config {} is not JSON: {e}", manifest.config().digest()))
        })?;
        for layer in manifest.layers() {
            let digest = descriptor_digest(layer).map_err(|m| self.invalid(m))?;
            let size = fs::metadata(self.blob_path(&digest))
                .map_err(|source| self.read_err(&format!("layer {digest}"), source))?
                .len();
            if size != layer.size() {
                return Err(self
                    .invalid(format!("layer {digest} is {size} bytes, the manifest says {}", layer.size())));
            }
        }
        Ok(ImageMetadata { manifest_digest: Digest::of(&manifest_bytes), manifest, config })
    }

    fn platform_manifest(&self, descriptor: Descriptor) -> Result<Descriptor, LayoutError> {
        if *descriptor.media_type() != MediaType::ImageIndex {
            return Ok(descriptor);
        }
        let bytes = self.read_blob(&descriptor)?;
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| self.invalid(format!("image index {} is invalid: {e}", descriptor.digest())))?;
        linux_amd64(&index).cloned().ok_or_else(|| {
            self.invalid(format!("image index {} has no linux/amd64 image", descriptor.digest()))
        })
    }

    fn read_err(&self, what: &str, source: io::Error) -> LayoutError {
        LayoutError::Read { dir: self.dir.clone(), what: what.to_owned(), source }
    }

    fn invalid(&self, message: String) -> LayoutError {
        LayoutError::Invalid { dir: self.dir.clone(), message }
    }
}

/// Writes one image into a layout, all-or-nothing (see the module docs).
pub struct LayoutWriter {
    target: PathBuf,
    /// Where blobs and index.json are written: `target` itself, or a staging sibling.
    work: PathBuf,
    staged: bool,
    committed: bool,
}

impl LayoutWriter {
    /// Prepares to write into `dir`: an existing OCI layout gains the image, a missing directory
    /// is created at commit. An existing directory that is not a layout is refused, and so is a
    /// path through a file. Every refusal comes from here, so callers that assemble for a while
    /// call this first and learn of an unusable output at once.
    pub fn begin(dir: &Path) -> Result<Self, LayoutError> {
        let write_err =
            |what: &str, source| LayoutError::Write { dir: dir.to_path_buf(), what: what.into(), source };
        // Creating a directory under a file fails with a bare "File exists" or "Not a directory"
        // that names neither path; say which file is in the way.
        if let Some(file) = file_in_the_way(dir) {
            return Err(LayoutError::NotADirectory { dir: dir.to_path_buf(), file });
        }
        if dir.exists() {
            let empty_dir = fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false);
            if !empty_dir {
                Layout::open(dir).map_err(|_| LayoutError::Invalid {
                    dir: dir.to_path_buf(),
                    message: "exists and is not an OCI image layout; choose a new or empty directory".into(),
                })?;
                return Ok(LayoutWriter {
                    target: dir.into(),
                    work: dir.into(),
                    staged: false,
                    committed: false,
                });
            }
        }
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("layout");
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(parent)
            .map_err(|e| write_err(&format!("parent directory {}", parent.display()), e))?;
        let work = parent.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(work.join("blobs/sha256"))
            .map_err(|e| write_err(&format!("staging directory in {}", parent.display()), e))?;
        fs::write(work.join(OCI_LAYOUT_FILE), OCI_LAYOUT_CONTENT).map_err(|e| write_err("oci-layout", e))?;
        Ok(LayoutWriter { target: dir.into(), work, staged: true, committed: false })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.work.join("blobs/sha256").join(digest.hex())
    }

    fn write_err(&self, what: String, source: io::Error) -> LayoutError {
        LayoutError::Write { dir: self.target.clone(), what, source }
    }

    /// Stores a blob under its digest unless it is already there.
    pub fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), LayoutError> {
        let path = self.blob_path(digest);
        if path.exists() {
            return Ok(());
        }
        write_atomically(&path, bytes).map_err(|e| self.write_err(format!("blob {digest}"), e))
    }

    /// Writes a layer straight into the layout as it is compressed (a temporary file renamed to
    /// its digest at the end): the blob is never held in memory, whatever its size. Deflated
    /// blocks `cache` holds are read from it.
    pub fn write_layer(
        &self,
        layer: &LayerBuilder,
        mtime: u64,
        cache: Option<&Arc<BlockCache>>,
    ) -> Result<LayerDigests, LayoutError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = self.work.join("blobs/sha256");
        let tmp =
            dir.join(format!(".layer-{}-{}.tmp", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let written = (|| {
            let file = io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            let (digests, file) = layer.write_cached(file, mtime, cache)?;
            file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            let dest = self.blob_path(&digests.digest);
            if dest.exists() {
                fs::remove_file(&tmp)?;
            } else {
                fs::rename(&tmp, &dest)?;
            }
            Ok::<_, io::Error>(digests)
        })();
        written.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.write_err("a layer".into(), e)
        })
    }

    /// Copies a blob from another layout, checking its digest on the way; a hard link is used when
    /// both layouts share a filesystem.
    pub fn copy_blob(&self, from: &Layout, descriptor: &Descriptor) -> Result<(), LayoutError> {
        let digest = descriptor_digest(descriptor)
            .map_err(|message| LayoutError::Invalid { dir: from.dir().into(), message })?;
        let dest = self.blob_path(&digest);
        if dest.exists() {
            return Ok(());
        }
        let src = from.blob_path(&digest);
        let read_err =
            |source| LayoutError::Read { dir: from.dir().into(), what: format!("blob {digest}"), source };
        let mut input = File::open(&src).map_err(read_err)?;
        let tmp = temp_sibling(&dest);
        let copied = (|| {
            let mut out = HashingWriter::new(io::BufWriter::new(File::create(&tmp)?));
            io::copy(&mut input, &mut out)?;
            let (got, size, file) = out.finish();
            file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok::<_, io::Error>((got, size))
        })();
        let result = match copied {
            Ok((got, size)) if got == digest && size == descriptor.size() => {
                fs::rename(&tmp, &dest).map_err(|e| self.write_err(format!("blob {digest}"), e))
            }
            Ok((got, size)) => Err(LayoutError::Invalid {
                dir: from.dir().into(),
                message: format!("blob {digest} holds {size} bytes with digest {got}: the layout is corrupt"),
            }),
            Err(e) => Err(self.write_err(format!("blob {digest}"), e)),
        };
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Points `tag` at the manifest (replacing an older image of that tag) and makes the layout
    /// visible. Every blob the manifest names must already be written.
    pub fn commit(mut self, tag: &str, manifest: &Descriptor) -> Result<(), LayoutError> {
        let index_path = self.work.join("index.json");
        let mut index = if index_path.exists() {
            Layout { dir: self.work.clone() }.index()?
        } else {
            oci_spec::image::ImageIndexBuilder::default()
                .schema_version(2u32)
                .media_type(MediaType::ImageIndex)
                .manifests(Vec::<Descriptor>::new())
                .build()
                .map_err(|e| self.write_err("index.json".into(), io::Error::other(e)))?
        };
        let mut entry = manifest.clone();
        entry.set_annotations(Some([(ANNOTATION_REF_NAME.to_owned(), tag.to_owned())].into_iter().collect()));
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| {
                d.annotations().as_ref().and_then(|a| a.get(ANNOTATION_REF_NAME)).map(String::as_str)
                    != Some(tag)
            })
            .cloned()
            .collect();
        manifests.push(entry);
        index.set_manifests(manifests);
        let bytes = to_canonical_json(&index).map_err(|e| self.write_err("index.json".into(), e.into()))?;
        write_atomically(&index_path, &bytes).map_err(|e| self.write_err("index.json".into(), e))?;
        if self.staged {
            fs::rename(&self.work, &self.target)
                .map_err(|e| self.write_err("the layout directory".into(), e))?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for LayoutWriter {
    fn drop(&mut self) {
        if self.staged && !self.committed {
            let _ = fs::remove_dir_all(&self.work);
        }
    }
}

/// The nearest existing ancestor of `path` (itself included), when it is not a directory.
fn file_in_the_way(path: &Path) -> Option<PathBuf> {
    for ancestor in path.ancestors().filter(|a| !a.as_os_str().is_empty()) {
        // A missing path, or one under a file (ENOTDIR), says nothing yet: look further up.
        if let Ok(metadata) = fs::metadata(ancestor) {
            return (!metadata.is_dir()).then(|| ancestor.to_path_buf());
        }
    }
    None
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("blob");
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes a file under a temporary name and renames it, so readers never see half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_among_the_parents_is_named_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hostname");
        fs::write(&file, "not a directory").unwrap();
        for target in [file.join("out"), file.join("a/b/out"), file.clone()] {
            let Err(error) = LayoutWriter::begin(&target) else { panic!("{target:?} was accepted") };
            assert!(
                matches!(&error, LayoutError::NotADirectory { file: f, .. } if *f == file),
                "{target:?}: {error}"
            );
            let message = error.to_string();
            assert!(message.contains(&format!("{} is a file, not a directory", file.display())), "{message}");
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "something was created beside the file");
        assert!(LayoutWriter::begin(&dir.path().join("new/out")).is_ok());
    }
}
