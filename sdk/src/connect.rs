//! How a client reaches and authenticates to a cluster's NATS servers ([`ConnectOptions`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::Client;
use crate::error::OpError;

/// Connecting failed; [`ConnectError::kind`] says how.
pub type ConnectError = OpError<ConnectErrorKind>;

/// How connecting failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectErrorKind {
    /// A server address could not be parsed.
    InvalidAddress,
    /// The credentials could not be read (a missing or malformed `.creds` file).
    Credentials,
    /// The server refused the credentials.
    Authentication,
    /// TLS could not be set up (certificates, or a server that does not offer TLS when it is
    /// required).
    Tls,
    /// No server could be reached in time.
    Unreachable,
    /// Connected, but the client's result inbox could not be set up.
    Setup,
}

/// How to reach and authenticate to a cluster, like the `nats` CLI's contexts.
///
/// ```no_run
/// # async fn example() -> Result<(), apiary_sdk::ConnectError> {
/// let client = apiary_sdk::ConnectOptions::new("tls://nats-1:4222,tls://nats-2:4222")
///     .credentials_file("/etc/apiary/app.creds")
///     .tls_root("/etc/apiary/ca.pem")
///     .name("billing")
///     .connect()
///     .await?;
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    servers: String,
    auth: Auth,
    tls_roots: Vec<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
    require_tls: bool,
    name: String,
    connection_timeout: Duration,
    request_timeout: Option<Duration>,
}

#[derive(Clone, Default)]
enum Auth {
    #[default]
    None,
    CredentialsFile(PathBuf),
    NkeySeed(String),
    Token(String),
    UserPassword(String, String),
}

/// Names the kind of credentials, never the secret: options end up in logs.
impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::CredentialsFile(path) => f.debug_tuple("CredentialsFile").field(path).finish(),
            Auth::NkeySeed(_) => f.write_str("NkeySeed(<hidden>)"),
            Auth::Token(_) => f.write_str("Token(<hidden>)"),
            Auth::UserPassword(user, _) => {
                write!(f, "UserPassword({user:?}, <hidden>)")
            }
        }
    }
}

impl ConnectOptions {
    /// Options for the servers at `servers` (comma-separated for several), with no
    /// credentials, no TLS requirement and a 5 s connection timeout.
    pub fn new(servers: impl Into<String>) -> Self {
        Self {
            servers: servers.into(),
            auth: Auth::None,
            tls_roots: Vec::new(),
            client_certificate: None,
            require_tls: false,
            name: "apiary-sdk".to_owned(),
            connection_timeout: Duration::from_secs(5),
            request_timeout: None,
        }
    }

    /// Authenticates with a `.creds` file (a user JWT and its nkey seed), as `nats --creds`.
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.auth = Auth::CredentialsFile(path.into());
        self
    }

    /// Authenticates with an nkey seed (`SU…`).
    pub fn nkey_seed(mut self, seed: impl Into<String>) -> Self {
        self.auth = Auth::NkeySeed(seed.into());
        self
    }

    /// Authenticates with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Token(token.into());
        self
    }

    /// Authenticates with a user name and password.
    pub fn user_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Auth::UserPassword(user.into(), password.into());
        self
    }

    /// Trusts the certificate authorities in this PEM file for the servers' certificates
    /// (besides the system's roots); may be given more than once.
    pub fn tls_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_roots.push(path.into());
        self
    }

    /// Presents this client certificate and key (PEM files) to servers that ask for one.
    pub fn client_certificate(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// Refuses servers that do not offer TLS.
    pub fn require_tls(mut self, required: bool) -> Self {
        self.require_tls = required;
        self
    }

    /// The connection's name, as servers show it (`nats server report connections`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How long connecting to one server may take.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long NATS requests wait for an answer by default (the client library's setting).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Connects, and sets up the client.
    pub async fn connect(self) -> Result<Client, ConnectError> {
        let options = match &self.auth {
            Auth::CredentialsFile(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|err| {
                    ConnectError::with_source(
                        ConnectErrorKind::Credentials,
                        format!("failed to read credentials from {}", path.display()),
                        err,
                    )
                })?,
            Auth::NkeySeed(seed) => async_nats::ConnectOptions::new().nkey(seed.clone()),
            Auth::Token(token) => async_nats::ConnectOptions::new().token(token.clone()),
            Auth::UserPassword(user, password) => {
                async_nats::ConnectOptions::new().user_and_password(user.clone(), password.clone())
            }
            Auth::None => async_nats::ConnectOptions::new(),
        };
        let mut options = options
            .name(&self.name)
            .connection_timeout(self.connection_timeout)
            .require_tls(self.require_tls);
        if let Some(timeout) = self.request_timeout {
            options = options.request_timeout(Some(timeout));
        }
        for root in &self.tls_roots {
            options = options.add_root_certificates(root.clone());
        }
        if let Some((cert, key)) = &self.client_certificate {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let nats = options
            .connect(self.servers.as_str())
            .await
            .map_err(|err| {
                let kind = match err.kind() {
                    async_nats::ConnectErrorKind::ServerParse => ConnectErrorKind::InvalidAddress,
                    async_nats::ConnectErrorKind::Authentication
                    | async_nats::ConnectErrorKind::AuthorizationViolation => {
                        ConnectErrorKind::Authentication
                    }
                    async_nats::ConnectErrorKind::Tls => ConnectErrorKind::Tls,
                    _ => ConnectErrorKind::Unreachable,
                };
                ConnectError::with_source(
                    kind,
                    format!("failed to connect to NATS at {}", self.servers),
                    err,
                )
            })?;
        Client::from_nats(nats).await
    }
}
