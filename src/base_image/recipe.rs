//! The base image recipe (`base-images/workerd/recipe.json`): which archives, pinned how, and what
//! to take from each.

use serde::Deserialize;

/// The recipe shipped with this version of workerbundle.
pub const BUILTIN_RECIPE: &str = include_str!("../../base-images/workerd/recipe.json");

#[derive(Clone, Debug, Deserialize)]
pub struct Recipe {
    pub workerd: NpmArchive,
    pub debs: Vec<DebArchive>,
    pub ca_bundle: CaBundle,
    #[serde(default)]
    pub directories: Vec<Directory>,
    pub config: ImageSettings,
}

#[derive(Clone, Debug, Deserialize)]
pub struct NpmArchive {
    pub npm_package: String,
    pub version: String,
    pub archive: String,
    pub sha256: String,
    /// Path of the workerd binary inside the npm tarball.
    pub binary: String,
    /// Where the binary goes in the image.
    pub install_as: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DebArchive {
    pub package: String,
    pub version: String,
    pub archive: String,
    pub sha256: String,
    /// Paths to take from the package's data: a prefix ending in `/` takes a whole tree.
    pub include: Vec<String>,
}

/// `ca-certificates` ships single certificates; the bundle workerd loads is generated at install
/// time, so the assembler concatenates them itself.
#[derive(Clone, Debug, Deserialize)]
pub struct CaBundle {
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Directory {
    pub path: String,
    /// Octal, as text (`"1777"`).
    pub mode: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ImageSettings {
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
}

impl Recipe {
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("base image recipe is invalid: {e}"))
    }
}

impl DebArchive {
    pub fn includes(&self, path: &str) -> bool {
        self.include.iter().any(|inc| match inc.strip_suffix('/') {
            Some(dir) => path == dir || path.starts_with(inc.as_str()),
            None => path == inc,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_recipe_parses_and_pins_every_archive() {
        let recipe = Recipe::parse(BUILTIN_RECIPE).unwrap();
        assert_eq!(recipe.workerd.version, "1.20261117.1");
        for sha in std::iter::once(&recipe.workerd.sha256).chain(recipe.debs.iter().map(|d| &d.sha256)) {
            assert_eq!(sha.len(), 64);
        }
    }

    #[test]
    fn include_prefixes_take_trees_and_exact_paths() {
        let deb = DebArchive {
            package: "p".into(),
            version: "1".into(),
            archive: "a".into(),
            sha256: "s".into(),
            include: vec!["lib/".into(), "usr/share/doc/p/copyright".into()],
        };
        assert!(deb.includes("lib"));
        assert!(deb.includes("lib/x86_64-linux-gnu/libc.so.6"));
        assert!(deb.includes("usr/share/doc/p/copyright"));
        assert!(!deb.includes("library"));
        assert!(!deb.includes("usr/share/doc/p/changelog.gz"));
    }
}
