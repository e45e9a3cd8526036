//! The plugin skeleton: env + stdin in, result or error JSON out.
use std::io::Write;

use tern_cni::{CniError, CniResult, Code, Command, Env, NetConf, Version};

/// What a plugin receives for one invocation.
#[derive(Debug, Clone)]
pub struct Request {
    pub env: Env,
    pub conf: NetConf,
    /// stdin as received, handed unchanged to delegates.
    pub stdin: Vec<u8>,
}

/// One CNI plugin. Versions are checked and env validated before any method
/// runs; methods never print.
pub trait Plugin: Sync {
    fn name(&self) -> &'static str;
    fn supported_versions(&self) -> &'static [Version] {
        &Version::ALL
    }
    fn add(&self, req: &Request) -> Result<CniResult, CniError>;
    fn del(&self, req: &Request) -> Result<(), CniError>;
    fn check(&self, req: &Request) -> Result<(), CniError>;
    fn status(&self, req: &Request) -> Result<(), CniError>;
    fn gc(&self, req: &Request) -> Result<(), CniError>;
}

/// The outcome of one invocation, before it is written out.
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

/// Run `plugin` for the given environment and stdin. Pure with respect to the
/// process: the caller writes `stdout` and exits with `exit_code`.
pub fn run(plugin: &dyn Plugin, get_env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    match dispatch(plugin, get_env, stdin) {
        Ok(out) => Outcome { stdout: out, exit_code: 0 },
        Err(e) => Outcome { stdout: e.to_json(), exit_code: 1 },
    }
}

fn dispatch(plugin: &dyn Plugin, get_env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<String, CniError> {
    let env = Env::from_lookup(&get_env)?;
    if env.command == Command::Version {
        return Ok(version_reply(plugin, stdin));
    }
    let conf = NetConf::parse(stdin, env.command, plugin.supported_versions())?;
    let version = conf.cni_version;
    let req = Request { env, conf, stdin: stdin.to_vec() };
    let tag = |mut e: CniError| {
        e.cni_version = version.as_str().to_string();
        e
    };
    match req.env.command {
        Command::Add => {
            let result = plugin.add(&req).map_err(tag)?;
            result.to_json_string(version).map_err(tag)
        }
        Command::Del => plugin.del(&req).map(|_| String::new()).map_err(tag),
        Command::Check => {
            if req.conf.prev_result.is_none() {
                return Err(tag(CniError::invalid_config("Required prevResult missing (prevResult)")));
            }
            plugin.check(&req).map(|_| String::new()).map_err(tag)
        }
        Command::Status => plugin.status(&req).map(|_| String::new()).map_err(tag),
        Command::Gc => plugin.gc(&req).map(|_| String::new()).map_err(tag),
        Command::Version => unreachable!("handled above"),
    }
}

/// VERSION echoes the runtime's version as the spec says (the reference
/// plugins print their own library's version instead).
fn version_reply(plugin: &dyn Plugin, stdin: &[u8]) -> String {
    let asked = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(|s| s.as_str()).map(str::to_string))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| Version::LATEST.as_str().to_string());
    let supported: Vec<&str> = plugin.supported_versions().iter().map(|v| v.as_str()).collect();
    serde_json::json!({ "cniVersion": asked, "supportedVersions": supported }).to_string()
}

/// The "about" text printed to stderr when started without CNI_COMMAND.
pub fn about(plugin: &dyn Plugin) -> String {
    let supported: Vec<&str> = plugin.supported_versions().iter().map(|v| v.as_str()).collect();
    format!(
        "CNI {} plugin version {}\nCNI protocol versions supported: {}\n",
        plugin.name(),
        env!("CARGO_PKG_VERSION"),
        supported.join(", ")
    )
}

/// Entry point used by the binary: real env, real stdin, real stdout.
pub fn main(plugin: &dyn Plugin) -> i32 {
    if std::env::var("CNI_COMMAND").map(|c| c.is_empty()).unwrap_or(true) {
        eprint!("{}", about(plugin));
        return 0;
    }
    let mut stdin = Vec::new();
    if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut stdin) {
        let err = CniError::new(Code::Io, format!("error reading from stdin: {e}"));
        println!("{}", err.to_json());
        return 1;
    }
    let outcome = run(plugin, |k| std::env::var(k).ok(), &stdin);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    if !outcome.stdout.is_empty() {
        let _ = out.write_all(b"\n");
    }
    let _ = out.flush();
    outcome.exit_code
}
