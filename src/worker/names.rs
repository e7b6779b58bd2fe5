//! Name rules: worker names, module paths, binding and environment names.

/// A worker name must be a DNS-1123 label: it names a Kubernetes port, a Service port and a
/// directory in the image.
pub fn check_worker_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let valid_chars = bytes.iter().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'));
    let valid_ends = bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric);
    if name.is_empty() || name.len() > 63 || !valid_chars || !valid_ends {
        return Err(format!(
            "worker name {name:?} is not a DNS-1123 label (1-63 characters of a-z, 0-9 and '-', \
             starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// A module path is relative, `/`-separated, and stays inside the worker's directory: no
/// absolute paths, no `..` or `.` components, no empty components, no control characters.
pub fn check_module_path(path: &str) -> Result<(), String> {
    let problem = if path.is_empty() {
        Some("is empty")
    } else if path.starts_with('/') {
        Some("is absolute")
    } else if path.contains('\\') {
        Some("contains a backslash")
    } else if path.chars().any(char::is_control) {
        Some("contains a control character")
    } else if path.split('/').any(|c| c == "..") {
        Some("contains '..'")
    } else if path.split('/').any(|c| c.is_empty() || c == ".") {
        Some("has an empty or '.' component")
    } else if path.len() > 1024 {
        Some("is longer than 1024 bytes")
    } else {
        None
    };
    match problem {
        Some(why) => Err(format!(
            "module path {path:?} {why}; module paths must be relative and stay inside the worker"
        )),
        None => Ok(()),
    }
}

/// Binding names become JavaScript property names: any text but NUL.
pub fn check_binding_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains('\0') || name.len() > 256 {
        return Err(format!("binding name {name:?} must be 1-256 characters without NUL"));
    }
    Ok(())
}

/// A secret's name is also the tail of an environment variable name, which cannot hold `=`.
pub fn check_secret_name(name: &str) -> Result<(), String> {
    if name.contains('=') {
        return Err(format!(
            "secret binding name {name:?} cannot contain '=': it names an environment variable"
        ));
    }
    Ok(())
}

/// Environment variables the dynamic loader, glibc or this platform read, by their documentation:
/// ld.so(8) (every `LD_*`), glibc's list of variables it ignores for privileged programs
/// (`unsecvars.h`: they change what the process loads or where it reads its data), the locale and
/// time zone variables, and workerbundle's own (`WORKERBUNDLE_*`, e.g. the log service's value).
/// A secret is handed to workerd as `<prefix><SECRET NAME>` for every key of the worker's Secret
/// (Kubernetes `envFrom`): no prefix may make one of these reachable.
const RESERVED_PREFIXES: [&str; 6] = ["LD_", "MALLOC_", "GLIBC_", "LC_", "GCONV_", "WORKERBUNDLE_"];
const RESERVED_NAMES: [&str; 17] = [
    "GCONV_PATH",
    "GETCONF_DIR",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "TMPDIR",
    "TZDIR",
    "TZ",
    "LANG",
    "LANGUAGE",
    "PATH",
    "HOME",
    "SSL_CERT_FILE",
];

/// An environment prefix must be usable in a Kubernetes `envFrom.prefix` (C-identifier
/// characters), and no secret name after it may make a variable the loader, glibc or the
/// platform reads (see [`RESERVED_PREFIXES`]): the empty prefix, `L`, `LD_`, `T` ... are refused.
pub fn check_env_prefix(prefix: &str) -> Result<(), String> {
    let valid = prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !prefix.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(format!(
            "environment prefix {prefix:?} may hold only letters, digits and '_', and must not start with a digit"
        ));
    }
    let upper = prefix.to_ascii_uppercase();
    let reaches = RESERVED_PREFIXES.iter().find(|r| upper.starts_with(*r) || r.starts_with(upper.as_str()));
    let reaches = reaches.or_else(|| RESERVED_NAMES.iter().find(|r| r.starts_with(upper.as_str())));
    if let Some(reserved) = reaches {
        return Err(format!(
            "environment prefix {prefix:?} would let a secret's name make {reserved}…, a variable the \
             dynamic loader, glibc or workerbundle reads; choose a prefix of your own, e.g. APP_"
        ));
    }
    Ok(())
}

/// The prefix of the environment variables of a tenant's worker (one uploaded through the API or
/// applied as a WorkerDeployment without `envPrefix`): a fixed namespace and a hash of the
/// worker's name, never the name itself. Fixed length, so `<prefix><SECRET>` is unique per
/// (worker, secret) by construction (`col` + `X_K` and `col-x` + `K` cannot meet), and no
/// tenant string can choose where a variable name starts.
pub fn tenant_env_prefix(worker_name: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(worker_name.as_bytes());
    format!("WB{}_", hex::encode_upper(&digest[..6]))
}

/// The default prefix of a worker's environment variables: `my-api` -> `MY_API_`.
pub fn default_env_prefix(worker_name: &str) -> String {
    format!("{}_", worker_name.to_ascii_uppercase().replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_follow_dns_1123() {
        for ok in ["a", "hello", "my-api", "a1", &"x".repeat(63)] {
            assert!(check_worker_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Hello", "a_b", "a.b", "a b", &"x".repeat(64), "é"] {
            assert!(check_worker_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn module_paths_stay_inside() {
        for ok in ["index.js", "lib/util.js", "a\"b.js", "dir/x y.txt", "..hidden.js"] {
            assert!(check_module_path(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x.js", "a/../../x", "a//b", "./a", "a/./b", "a\\b", "a\nb", "a/"] {
            assert!(check_module_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_prefix_defaults_and_rules() {
        assert_eq!(default_env_prefix("my-api"), "MY_API_");
        assert!(check_env_prefix("MY_API_").is_ok());
        assert!(check_env_prefix("1X").is_err());
        assert!(check_env_prefix("A-B").is_err());
    }

    /// A worker named `ld` with a secret `PRELOAD` once set LD_PRELOAD in workerd's environment.
    #[test]
    fn no_prefix_reaches_a_variable_the_loader_or_libc_reads() {
        for bad in [
            "",
            "L",
            "LD",
            "LD_",
            "ld_",
            "LD_X_",
            "MALLOC_",
            "GLIBC_",
            "LC_",
            "T",
            "TZ",
            "G",
            "WORKERBUNDLE_",
            "WORKERBUNDLE_LOG_",
            "P",
            "SSL_CERT_",
        ] {
            assert!(check_env_prefix(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(check_env_prefix(&default_env_prefix("ld")).is_err(), "the name-based prefix of `ld`");
        for good in ["APP_", "SECRET_", "MY_API_", "AUTH_"] {
            assert!(check_env_prefix(good).is_ok(), "{good:?} was refused");
        }
    }

    #[test]
    fn tenant_prefixes_are_fixed_length_safe_and_distinct() {
        let (col, col_x) = (tenant_env_prefix("col"), tenant_env_prefix("col-x"));
        assert_eq!(col.len(), col_x.len());
        assert_ne!(format!("{col}X_K"), format!("{col_x}K"));
        for name in ["ld", "col", "malloc", "workerbundle", "tz", "a"] {
            let prefix = tenant_env_prefix(name);
            assert!(prefix.starts_with("WB") && prefix.len() == 15, "{prefix}");
            check_env_prefix(&prefix).unwrap();
        }
    }
}
