//! The recipes of the images assembled from package archives: the workerd base image
//! (`base-images/workerd/recipe.json`) and the controller's own image
//! (`base-images/controller/recipe.json`). Both name which archives, pinned how, and what to take
//! from each; they share the runtime part (Debian packages, CA bundle, directories).

use serde::Deserialize;

/// The workerd base image recipe shipped with this version of workerbundle.
pub const BUILTIN_RECIPE: &str = include_str!("../../base-images/workerd/recipe.json");
/// The controller image recipe shipped with this version of workerbundle.
pub const BUILTIN_CONTROLLER_RECIPE: &str = include_str!("../../base-images/controller/recipe.json");

/// The workerd base image: the runtime plus workerd from npm.
#[derive(Clone, Debug, Deserialize)]
pub struct Recipe {
    pub workerd: NpmArchive,
    #[serde(flatten)]
    pub runtime: RuntimeRecipe,
    pub config: ImageSettings,
}

/// The controller's image: the runtime plus a workerbundle binary given at assembly time.
#[derive(Clone, Debug, Deserialize)]
pub struct ControllerRecipe {
    /// The same workerd as the base image's: the API and the controller load each worker in it
    /// before storing or releasing it (the start-up check).
    pub workerd: NpmArchive,
    #[serde(flatten)]
    pub runtime: RuntimeRecipe,
    pub binary: BinaryInstall,
    pub config: ImageSettings,
}

/// The runtime layer both images start from: files of Debian packages, the CA bundle made from
/// them, and a few empty directories.
#[derive(Clone, Debug, Deserialize)]
pub struct RuntimeRecipe {
    pub debs: Vec<DebArchive>,
    pub ca_bundle: CaBundle,
    #[serde(default)]
    pub directories: Vec<Directory>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BinaryInstall {
    /// Where the binary goes in the image.
    pub install_as: String,
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

impl ControllerRecipe {
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("controller image recipe is invalid: {e}"))
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
        for sha in
            std::iter::once(&recipe.workerd.sha256).chain(recipe.runtime.debs.iter().map(|d| &d.sha256))
        {
            assert_eq!(sha.len(), 64);
        }
    }

    /// The controller runs on the same glibc and CA certificates as workerd: a pin refreshed in
    /// one recipe must be refreshed in the other (fetch.py --refresh-pins --recipe ...).
    #[test]
    fn controller_recipe_pins_the_packages_it_shares_with_the_base_the_same_way() {
        let base = Recipe::parse(BUILTIN_RECIPE).unwrap();
        let controller = ControllerRecipe::parse(BUILTIN_CONTROLLER_RECIPE).unwrap();
        let mut shared = 0;
        for deb in &controller.runtime.debs {
            assert_eq!(deb.sha256.len(), 64, "{}", deb.package);
            if let Some(same) = base.runtime.debs.iter().find(|b| b.package == deb.package) {
                assert_eq!(
                    (&same.version, &same.sha256),
                    (&deb.version, &deb.sha256),
                    "{} is pinned differently in the two recipes",
                    deb.package
                );
                shared += 1;
            }
        }
        assert_eq!(
            shared,
            base.runtime.debs.len(),
            "the controller image lacks a package of the base runtime"
        );
        assert_eq!(controller.config.user.as_deref(), Some("65532:65532"));
        // The start-up check must load workers in the workerd the bundles run.
        assert_eq!(
            (&controller.workerd.version, &controller.workerd.sha256, &controller.workerd.install_as),
            (&base.workerd.version, &base.workerd.sha256, &base.workerd.install_as),
            "the two recipes pin different workerds"
        );
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
