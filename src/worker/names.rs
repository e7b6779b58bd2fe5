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

/// An environment prefix must be usable in a Kubernetes `envFrom.prefix`: C-identifier characters.
pub fn check_env_prefix(prefix: &str) -> Result<(), String> {
    let valid = prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !prefix.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(format!(
            "environment prefix {prefix:?} may hold only letters, digits and '_', and must not start with a digit"
        ));
    }
    Ok(())
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
        assert!(check_env_prefix("").is_ok());
        assert!(check_env_prefix("1X").is_err());
        assert!(check_env_prefix("A-B").is_err());
    }
}
