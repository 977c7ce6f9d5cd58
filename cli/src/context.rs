//! Where the CLI connects, and as whom: a context file like the `nats` CLI's contexts,
//! overridden by `APIARY_NATS_URL`/`APIARY_CREDS`, overridden by `--server`/`--creds`.
//!
//! The file is `$XDG_CONFIG_HOME/apiary/context.toml` (`~/.config/apiary/context.toml`), or
//! `APIARY_CONTEXT_FILE`. Each table is a named context; `current` names the one used when
//! `--context` does not:
//!
//! ```toml
//! current = "prod"
//!
//! [prod]
//! server = "tls://nats-1.example.net:4222,tls://nats-2.example.net:4222"
//! creds = "/home/me/.config/apiary/prod.creds"
//! tls_ca = "/home/me/.config/apiary/ca.pem"
//!
//! [local]
//! server = "nats://127.0.0.1:4222"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

/// One named context: how to reach and authenticate to a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Server URLs, comma-separated.
    pub server: Option<String>,
    /// A `.creds` file (user JWT and nkey seed).
    pub creds: Option<PathBuf>,
    /// An nkey seed (`SU…`).
    pub nkey: Option<String>,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// A PEM file of certificate authorities to trust.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that ask for one.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// The context file: named contexts, and which one is current.
#[derive(Debug, Default, Deserialize)]
struct ContextFile {
    current: Option<String>,
    #[serde(flatten)]
    contexts: BTreeMap<String, Context>,
}

/// Where the context file is: `APIARY_CONTEXT_FILE`, else under the user's configuration
/// directory.
pub fn default_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("APIARY_CONTEXT_FILE") {
        return Some(PathBuf::from(path));
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(config.join("apiary").join("context.toml"))
}

/// The context named `name` (or the file's current one) from the file at `path`. A missing
/// file is no context, unless a name was asked for.
pub fn load(path: &Path, name: Option<&str>) -> anyhow::Result<Context> {
    if !path.exists() {
        if let Some(name) = name {
            anyhow::bail!("no context {name:?}: {} does not exist", path.display());
        }
        return Ok(Context::default());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read the context file {}", path.display()))?;
    let file: ContextFile = toml::from_str(&text)
        .with_context(|| format!("failed to parse the context file {}", path.display()))?;
    let Some(name) = name.map(str::to_owned).or(file.current) else {
        return Ok(Context::default());
    };
    file.contexts.get(&name).cloned().with_context(|| {
        let known: Vec<_> = file.contexts.keys().collect();
        format!(
            "no context {name:?} in {} (it has {known:?})",
            path.display()
        )
    })
}

impl Context {
    /// The connect options: this context, with `server` and `creds` (from the command line
    /// or the environment) taking precedence.
    pub fn options(
        &self,
        server: Option<&str>,
        creds: Option<&Path>,
    ) -> apiary_sdk::ConnectOptions {
        let mut options =
            apiary_sdk::ConnectOptions::new(self.server_for_messages(server)).name("apiary-cli");
        if let Some(creds) = creds.map(Path::to_path_buf).or_else(|| self.creds.clone()) {
            options = options.credentials_file(creds);
        } else if let Some(seed) = &self.nkey {
            options = options.nkey_seed(seed.clone());
        } else if let Some(token) = &self.token {
            options = options.token(token.clone());
        } else if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_password(user.clone(), password.clone());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.tls_root(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options.client_certificate(cert.clone(), key.clone());
        }
        options
    }

    /// Where this context connects, `server` (from the command line or the environment)
    /// taking precedence.
    pub fn server_for_messages(&self, server: Option<&str>) -> String {
        server
            .map(str::to_owned)
            .or_else(|| self.server.clone())
            .unwrap_or_else(|| apiary_proto::DEFAULT_NATS_URL.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("context.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    const FILE: &str = r#"
        current = "prod"
        [prod]
        server = "tls://prod:4222"
        creds = "/etc/prod.creds"
        [local]
        server = "nats://127.0.0.1:4222"
    "#;

    #[test]
    fn the_current_context_is_used_unless_one_is_named() {
        let (_dir, path) = file(FILE);
        let current = load(&path, None).unwrap();
        assert_eq!(current.server.as_deref(), Some("tls://prod:4222"));
        let local = load(&path, Some("local")).unwrap();
        assert_eq!(local.server.as_deref(), Some("nats://127.0.0.1:4222"));
        assert!(
            load(&path, Some("nope"))
                .unwrap_err()
                .to_string()
                .contains("local")
        );
    }

    #[test]
    fn a_server_from_the_command_line_overrides_the_contexts() {
        let (_dir, path) = file(FILE);
        let prod = load(&path, None).unwrap();
        assert_eq!(prod.server_for_messages(None), "tls://prod:4222");
        assert_eq!(
            prod.server_for_messages(Some("nats://other:4222")),
            "nats://other:4222"
        );
        assert_eq!(
            Context::default().server_for_messages(None),
            apiary_proto::DEFAULT_NATS_URL
        );
    }

    #[test]
    fn a_missing_file_is_no_context_unless_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        assert_eq!(load(&path, None).unwrap(), Context::default());
        assert!(load(&path, Some("prod")).is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let (_dir, path) = file("[prod]\nsevrer = \"typo\"\n");
        assert!(load(&path, Some("prod")).is_err());
    }
}
