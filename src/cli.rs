//! The command line: `get`, `inspect`, `pull`. Parses with argh, runs the
//! library, and turns the outcome into one stderr line and an exit code
//! (0 success, 1 failure, 2 usage, 128+N after signal N).

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use argh::FromArgs;

use crate::error::{Error, Result};
use crate::inspect::Report;
use crate::manifest::{Format, disk_plan};
use crate::output::Target;
use crate::progress::Progress;
use crate::pull::{ENV_COCOON, ExecCocoon, Puller};
use crate::reference::Reference;
use crate::route::Sparse;
use crate::sink::Sink;
use crate::source::registry::auth::{Credentials, Secret};
use crate::source::registry::client::redact;
use crate::source::registry::tls::ENV_CA_CERT;
use crate::source::registry::{ENV_SERVER, RegistryOptions};
use crate::source::{SourceOptions, parse_platform};
use crate::stream::{self, Options};
use crate::{signals, source};

#[derive(FromArgs, Debug)]
#[argh(
    description = "Stream an OCI-packaged cloud image (a VM disk, often split into parts) out of an \
OCI registry or image layout, verified, into a file, a pipe, or `cocoon image import` — with the \
kernel doing the copying.",
    note = "SOURCE is an OCI image layout, oci:DIR[:REF] or oci:DIR@sha256:HEX; the same in a tar \
file, oci-archive:FILE[:REF] (as skopeo writes it; read in place); or a registry reference \
[docker://][HOST[:PORT]/]REPO[:TAG][@DIGEST] (no HOST: relative to $EPOCH_SERVER; https except \
for loopback hosts and --plain-http). As in skopeo, DIR ends at the first colon and REF may hold \
colons and slashes (oci:./l:127.0.0.1:5000/team/img:v1); reach a directory with a colon in its \
name through a symlink, or by a relative path from below the colon.\n\
Environment: EPOCH_SERVER (default http://127.0.0.1:8080), EPOCH_REGISTRY_TOKEN (bearer for \
EPOCH_SERVER only), EPOCH_CA_CERT (extra PEM CA), EPOCH_COCOON_BINARY (cocoon for `pull`), \
DOCKER_CONFIG then REGISTRY_AUTH_FILE (credentials; then $XDG_RUNTIME_DIR/containers/auth.json \
and ~/.config/containers/auth.json), CLOUDIMG_MIRRORS (comma-separated mirror URLs), \
CLOUDIMG_CHUNK_SIZE (bytes per range request), CLOUDIMG_IO=readwrite (portable I/O path), \
CLOUDIMG_CACHE (the cache layout of get and pull).\n\
Exit status: 0 success, 1 failure (one `cloudimg: …` line on stderr), 2 usage error, \
128+N after signal N (129 SIGHUP, 130 SIGINT, 143 SIGTERM, and so on for every catchable \
signal that would end the process).",
    example = "{command_name} inspect oci:./win11:25h2\n\
{command_name} get oci:./win11:25h2 -o win11.qcow2\n\
{command_name} get oci:./win11:25h2 -o win11.qcow2 && qemu-img convert -O raw win11.qcow2 win11.raw\n\
{command_name} get oci:./debian:12 > /dev/sdX    # a raw disk, onto a device\n\
{command_name} get oci-archive:./win11.tar:25h2 | ssh host 'cat > win11.qcow2'\n\
{command_name} pull oci:./win11:25h2 --name win11\n\
{command_name} pull windows/win11:25h2\n\
{command_name} get docker://ghcr.io/org/ubuntu:24.04 --platform linux/arm64 -o ubuntu.qcow2\n\
{command_name} copy ghcr.io/org/ubuntu:24.04 oci:./images:ubuntu --platform linux/arm64\n\
{command_name} get --cache ./cache ghcr.io/org/ubuntu:24.04 --platform linux/arm64 -o ubuntu.qcow2"
)]
struct Cli {
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Command {
    Copy(CopyArgs),
    Get(GetArgs),
    Inspect(InspectArgs),
    Pull(PullArgs),
    Serve(ServeArgs),
}

/// Declares a subcommand struct with the flags every command shares: the
/// ones that say how to reach the source (argh has no flattening). Field
/// types are matched as plain tokens (`Option<String>`), not as `ty`
/// fragments, because argh's derive reads the type's spelling.
macro_rules! with_source_flags {
    (
        $(#[$attr:meta])*
        struct $name:ident {
            $($(#[$fattr:meta])* $field:ident : $ty:ident $(<$inner:ident>)?,)*
        }
    ) => {
        $(#[$attr])*
        struct $name {
            $($(#[$fattr])* $field: $ty $(<$inner>)?,)*
            /// from an image index, pick OS/ARCH[/VARIANT] (default: linux/this machine)
            #[argh(option)]
            platform: Option<String>,
            /// use plain http for the registry even when it is not on loopback
            #[argh(switch)]
            plain_http: bool,
            /// user name for the registry (the password comes from --password-stdin)
            #[argh(option)]
            username: Option<String>,
            /// read the registry password from stdin
            #[argh(switch)]
            password_stdin: bool,
            /// a registry mirror (base URL) tried before the registry for blobs and
            /// digest-pinned manifests; repeatable (default: $CLOUDIMG_MIRRORS, comma-separated)
            #[argh(option)]
            mirror: Vec<String>,
            /// retries of a failed request or lost connection (default 5)
            #[argh(option, default = "5")]
            retries: u32,
            /// the stall bound in seconds (default 60): a read with no byte for this long,
            /// response headers or a whole manifest or token taking longer, or a blob body
            /// below 1 KiB/s averaged over this long, is a stall (retried, or resumed)
            #[argh(option, default = "60")]
            stall_timeout: u64,
            /// concurrent range requests per blob from a registry (default: 4, or 1 for a
            /// loopback registry, where parallel streams only add overhead; 1 = one stream)
            #[argh(option)]
            connections: Option<usize>,
        }

        impl $name {
            fn source_flags(&self) -> SourceFlags<'_> {
                SourceFlags {
                    platform: self.platform.as_deref(),
                    plain_http: self.plain_http,
                    username: self.username.as_deref(),
                    password_stdin: self.password_stdin,
                    mirrors: &self.mirror,
                    retries: self.retries,
                    stall_timeout: self.stall_timeout,
                    connections: self.connections,
                }
            }

            fn source_options(&self, env: &Environment) -> Result<SourceOptions> {
                source_options(self.source_flags(), env)
            }
        }
    };
}

with_source_flags! {
    /// write the assembled disk to stdout, or to FILE with -o
    #[derive(FromArgs, Debug)]
    #[argh(
        subcommand,
        name = "get",
        note = "Every disk layer is checked for its exact size and digest; on a mismatch the \
command exits 1 naming the layer. With -o FILE (a symlink: the file it names) the disk is \
written into a new file beside FILE, unnamed while written where the file system allows, and \
renamed over FILE only when complete and verified; only a regular file is ever replaced. A \
device, pipe or FIFO is written in place, a unix socket connected to. Refuses to write to a \
terminal.\n\
--format qcow2 turns a raw image into a qcow2 (version 3, compat 1.1, 64 KiB clusters) as it \
streams: metadata first, then the clusters that hold data. From a layout, clusters that are all \
zeros are left out (found in the blob files before the first byte is written); from a registry, \
where the data arrives once, every cluster is allocated. A qcow2 image is delivered as it is; \
--format raw of a qcow2 image is refused (use qemu-img convert)."
    )]
    struct GetArgs {
        /// the image (see SOURCE in the top-level help)
        #[argh(positional)]
        source: String,
        /// write to FILE instead of stdout
        #[argh(option, short = 'o')]
        output: Option<PathBuf>,
        /// skip digest checks (sizes are still enforced)
        #[argh(switch)]
        no_verify: bool,
        /// no progress, no summary line
        #[argh(switch, short = 'q')]
        quiet: bool,
        /// zero blocks become holes in a regular-file output: auto (raw disks, except
        /// blobs on the output's own file system, which are copied in the kernel),
        /// always, never (default auto)
        #[argh(option, default = "String::from(\"auto\")")]
        sparse: String,
        /// the disk format to write: auto (the image's own), qcow2 (a raw image becomes
        /// a qcow2), raw (default auto)
        #[argh(option, default = "String::from(\"auto\")")]
        format: String,
        /// a layout that caches registry images: read from when the image is there,
        /// filled while streaming when not (default: $CLOUDIMG_CACHE)
        #[argh(option)]
        cache: Option<PathBuf>,
    }
}

with_source_flags! {
    /// show an image's manifest, kind and disk plan
    #[derive(FromArgs, Debug)]
    #[argh(subcommand, name = "inspect")]
    struct InspectArgs {
        /// the image (see SOURCE in the top-level help)
        #[argh(positional)]
        source: String,
        /// print JSON instead of text
        #[argh(switch)]
        json: bool,
    }
}

with_source_flags! {
    /// stream the disk into `cocoon image import NAME`
    #[derive(FromArgs, Debug)]
    #[argh(
        subcommand,
        name = "pull",
        note = "cocoon commits an import when its stdin ends cleanly, so on any failure (read \
error, size or digest mismatch, a signal) cocoon's process group is killed before its stdin is \
closed, and a guardian process holds the pipe open should cloudimg itself be killed: a broken or \
unverified image is never committed. cocoon runs in a session of its own, without a terminal.\n\
cocoon's import takes a qcow2: a raw image is streamed as a qcow2 (version 3, compat 1.1; from a \
layout without its zero clusters, from a registry with every cluster allocated); --format raw \
sends the raw bytes instead. Before cocoon starts, the disk's first bytes are checked against its \
format (a qcow2 starts with QFI\\xfb), so a mislabelled or mis-sorted image fails naming its \
first layer."
    )]
    struct PullArgs {
        /// the image (see SOURCE in the top-level help)
        #[argh(positional)]
        source: String,
        /// the local image name (default: the repository's last path component, or DIR's base name)
        #[argh(option)]
        name: Option<String>,
        /// skip digest checks (sizes are still enforced)
        #[argh(switch)]
        no_verify: bool,
        /// no progress, no summary line
        #[argh(switch, short = 'q')]
        quiet: bool,
        /// what cocoon is sent: qcow2 (a raw image becomes a qcow2) or raw (the image's
        /// bytes as they are) (default qcow2)
        #[argh(option, default = "String::from(\"qcow2\")")]
        format: String,
        /// a layout that caches registry images: read from when the image is there,
        /// filled while streaming when not (default: $CLOUDIMG_CACHE)
        #[argh(option)]
        cache: Option<PathBuf>,
    }
}

with_source_flags! {
    /// copy an image, whole and verified, into an OCI image layout
    #[derive(FromArgs, Debug)]
    #[argh(
        subcommand,
        name = "copy",
        note = "DEST is oci:DIR[:TAG]; DIR is made when missing or empty, and a directory that \
holds other things and no oci-layout file is refused. TAG defaults to SOURCE's tag (none for a \
digest-pinned SOURCE: the manifest is listed untagged) and is written as the \
org.opencontainers.image.ref.name annotation, replacing the entry that had it. The copy holds the \
manifest, its config and every layer (disk or not); when SOURCE named an image index, the tag \
names the manifest chosen for the platform and the index is stored beside it, so that a \
reference pinned to the index's digest resolves in the copy too. Each blob is written under \
DIR/.cloudimg/partial, checked for its size and digest, synced and renamed into blobs/; a blob \
already there is hashed and kept; an interrupted copy is continued from where it stopped (the \
bytes already written are hashed again). index.json is replaced atomically under a lock \
(DIR/.cloudimg/lock), so concurrent copies into one layout keep every tag.",
        example = "{command_name} ghcr.io/org/ubuntu:24.04 oci:/srv/images/ubuntu\n\
{command_name} oci:./win11:25h2 oci:/mnt/usb/images:win11-25h2"
    )]
    struct CopyArgs {
        /// the image (see SOURCE in the top-level help)
        #[argh(positional)]
        source: String,
        /// where to: oci:DIR[:TAG]
        #[argh(positional)]
        dest: String,
        /// no progress, no summary line
        #[argh(switch, short = 'q')]
        quiet: bool,
    }
}

/// serve a directory of OCI image layouts over HTTP: disks under /dl/NAME, a
/// read-only registry under /v2/
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "serve",
    note = "DIR/NAME is a layout (NAME may hold slashes). Routes: GET|HEAD /dl/NAME[:TAG|@DIGEST] \
(the assembled disk, with Content-Length, ETag, Range), /v2/NAME/manifests/REF, \
/v2/NAME/blobs/DIGEST, /v2/NAME/tags/list. Every blob is hashed before its bytes are sent as \
good (a whole-disk GET streams while hashing and is cut short, never ended cleanly, if a digest \
fails); verdicts are remembered per file identity in DIR/.cloudimg-serve-verdicts. \
--no-verify sends without hashing: for trusted storage only. SIGINT/SIGTERM stop accepting, \
let running responses finish for --grace seconds, then close them; exit status 0.",
    example = "{command_name} --root /srv/images\n\
curl -fsSL http://127.0.0.1:8080/dl/win11 | cocoon image import win11\n\
qemu-img info http://127.0.0.1:8080/dl/win11"
)]
struct ServeArgs {
    /// the directory of OCI image layouts
    #[argh(option)]
    root: PathBuf,
    /// address and port to listen on (default 127.0.0.1:8080; another address
    /// exposes the images to whoever can reach it)
    #[argh(option, default = "String::from(\"127.0.0.1:8080\")")]
    listen: String,
    /// concurrent connections; more get 503 with Retry-After (default 64)
    #[argh(option, default = "64")]
    max_connections: usize,
    /// send blobs without hashing them: only for storage that is trusted
    /// (sizes are still enforced)
    #[argh(switch)]
    no_verify: bool,
    /// seconds a request head may take from its first byte (default 10)
    #[argh(option, default = "10")]
    head_timeout: u64,
    /// seconds a kept-alive connection may wait for its next request (default 60)
    #[argh(option, default = "60")]
    idle_timeout: u64,
    /// seconds a response may go without the client taking a byte (default 60)
    #[argh(option, default = "60")]
    send_timeout: u64,
    /// seconds running responses may go on after SIGINT/SIGTERM (default 10)
    #[argh(option, default = "10")]
    grace: u64,
    /// the verdict file (default DIR/.cloudimg-serve-verdicts)
    #[argh(option)]
    state: Option<PathBuf>,
}

/// The shared flags, borrowed from whichever command has them.
struct SourceFlags<'a> {
    platform: Option<&'a str>,
    plain_http: bool,
    username: Option<&'a str>,
    password_stdin: bool,
    mirrors: &'a [String],
    retries: u32,
    stall_timeout: u64,
    connections: Option<usize>,
}

/// Environment variable with comma-separated mirror URLs.
const ENV_MIRRORS: &str = "CLOUDIMG_MIRRORS";
/// Environment variable overriding the bytes per range request (tuning).
const ENV_CHUNK: &str = "CLOUDIMG_CHUNK_SIZE";
/// Environment knob that forces the portable read/write path (for tests and
/// benchmarks of the fallback).
const ENV_IO: &str = "CLOUDIMG_IO";
/// Environment variable naming the cache layout of `get` and `pull`.
const ENV_CACHE: &str = "CLOUDIMG_CACHE";
/// A bearer token for `EPOCH_SERVER` only.
const ENV_TOKEN: &str = "EPOCH_REGISTRY_TOKEN";

/// What the environment says, read once before anything runs: the library
/// reads none of it, it is handed these values as options. Empty values
/// count as unset.
struct Environment {
    epoch_server: Option<String>,
    epoch_token: Option<String>,
    ca_cert: Option<PathBuf>,
    cocoon: Option<OsString>,
    /// `$DOCKER_CONFIG`, else `$HOME/.docker`.
    docker_config: Option<PathBuf>,
    /// The containers auth files, in order: `$REGISTRY_AUTH_FILE`,
    /// `$XDG_RUNTIME_DIR/containers/auth.json`, `$HOME/.config/containers/auth.json`.
    auth_files: Vec<PathBuf>,
    mirrors: Option<String>,
    chunk_size: Option<String>,
    io: Option<String>,
    /// `$CLOUDIMG_CACHE`: the cache layout of `get` and `pull`.
    cache: Option<PathBuf>,
    /// `$TMPDIR`, else `/tmp`: where a repeated network blob is kept when
    /// the output has no directory of its own.
    temp_dir: PathBuf,
}

impl Environment {
    fn read() -> Environment {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let text = |name: &str| var(name).map(|v| v.to_string_lossy().into_owned());
        Environment {
            epoch_server: text(ENV_SERVER),
            epoch_token: text(ENV_TOKEN),
            ca_cert: var(ENV_CA_CERT).map(PathBuf::from),
            cocoon: var(ENV_COCOON),
            docker_config: var("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".docker"))),
            auth_files: [
                var("REGISTRY_AUTH_FILE").map(PathBuf::from),
                var("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("containers/auth.json")),
                var("HOME").map(|h| PathBuf::from(h).join(".config/containers/auth.json")),
            ]
            .into_iter()
            .flatten()
            .collect(),
            mirrors: text(ENV_MIRRORS),
            chunk_size: text(ENV_CHUNK),
            io: text(ENV_IO),
            cache: var(ENV_CACHE).map(PathBuf::from),
            temp_dir: var("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from),
        }
    }
}

/// Flag values that cannot work, found before anything runs: a usage error
/// (exit 2), one line.
fn check_source_flags(f: &SourceFlags<'_>) -> Result<()> {
    let usage = |m: &str| Err(Error::Usage(m.to_owned()));
    if let Some(p) = f.platform {
        parse_platform(p)?;
    }
    match (f.username, f.password_stdin) {
        (Some(_), true) | (None, false) => {}
        (Some(_), false) => {
            return usage("--username needs --password-stdin (the password is read from stdin)");
        }
        (None, true) => return usage("--password-stdin needs --username"),
    }
    for m in f.mirrors {
        check_mirror(m).map_err(Error::Usage)?;
    }
    if f.connections == Some(0) {
        return usage("--connections must be at least 1");
    }
    if f.stall_timeout == 0 {
        return usage("--stall-timeout must be at least 1 second");
    }
    Ok(())
}

fn check_mirror(m: &str) -> std::result::Result<(), String> {
    if m.starts_with("http://") || m.starts_with("https://") {
        Ok(())
    } else {
        Err(format!(
            "mirror {:?} must be an http:// or https:// base URL",
            redact(m)
        ))
    }
}

fn parse_sparse(s: &str) -> Result<Sparse> {
    match s {
        "auto" => Ok(Sparse::Auto),
        "always" => Ok(Sparse::Always),
        "never" => Ok(Sparse::Never),
        other => Err(Error::Usage(format!(
            "--sparse {other:?}: expected auto, always or never"
        ))),
    }
}

/// `--format`: `None` for auto (where allowed), else the format.
fn parse_format(s: &str, auto: bool) -> Result<Option<Format>> {
    match s {
        "auto" if auto => Ok(None),
        "qcow2" => Ok(Some(Format::Qcow2)),
        "raw" => Ok(Some(Format::Raw)),
        other if auto => Err(Error::Usage(format!(
            "--format {other:?}: expected auto, qcow2 or raw"
        ))),
        other => Err(Error::Usage(format!(
            "--format {other:?}: expected qcow2 or raw"
        ))),
    }
}

/// The first usage error in the command's flag values, if any.
fn check_usage(command: &Command) -> Result<()> {
    match command {
        Command::Get(a) => parse_sparse(&a.sparse)
            .and_then(|_| parse_format(&a.format, true))
            .and_then(|_| check_source_flags(&a.source_flags())),
        Command::Inspect(a) => check_source_flags(&a.source_flags()),
        Command::Copy(a) => copy_dest(&a.dest)
            .map(|_| ())
            .and_then(|()| check_source_flags(&a.source_flags())),
        Command::Pull(a) => {
            parse_format(&a.format, false).and_then(|_| check_source_flags(&a.source_flags()))
        }
        Command::Serve(a) => check_serve_flags(a),
    }
}

fn check_serve_flags(a: &ServeArgs) -> Result<()> {
    if a.max_connections == 0 {
        return Err(Error::Usage("--max-connections must be at least 1".into()));
    }
    for (flag, v) in [
        ("--head-timeout", a.head_timeout),
        ("--idle-timeout", a.idle_timeout),
        ("--send-timeout", a.send_timeout),
    ] {
        if v == 0 {
            return Err(Error::Usage(format!("{flag} must be at least 1 second")));
        }
    }
    Ok(())
}

/// Flags already passed [`check_source_flags`], and the environment.
fn source_options(f: SourceFlags<'_>, env: &Environment) -> Result<SourceOptions> {
    let platform = f.platform.map(parse_platform).transpose()?;
    let credentials = match f.username {
        Some(user) if f.password_stdin => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .map_err(|e| Error::io("reading the password from stdin", e))?;
            let password = password.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                return Err(Error::Other(
                    "--password-stdin: stdin held no password".into(),
                ));
            }
            Some(Credentials {
                username: user.to_owned(),
                password: Secret::new(password),
            })
        }
        _ => None,
    };
    let mut mirrors: Vec<String> = f.mirrors.to_vec();
    if mirrors.is_empty()
        && let Some(listed) = &env.mirrors
    {
        mirrors = listed
            .split([',', ' '])
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect();
        for m in &mirrors {
            check_mirror(m).map_err(|e| Error::Config(format!("{ENV_MIRRORS}: {e}")))?;
        }
    }
    let chunk_size = match &env.chunk_size {
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|&n| n >= 4096)
            .ok_or_else(|| {
                Error::Config(format!("{ENV_CHUNK}={v:?}: want a byte count >= 4096"))
            })?,
        None => RegistryOptions::default().chunk_size,
    };
    Ok(SourceOptions {
        platform,
        registry: RegistryOptions {
            epoch_server: env.epoch_server.clone(),
            epoch_token: env.epoch_token.clone().map(Secret::new),
            ca_cert: env.ca_cert.clone(),
            docker_config: env.docker_config.clone(),
            auth_files: env.auth_files.clone(),
            chunk_size,
            plain_http: f.plain_http,
            credentials,
            mirrors,
            retries: f.retries,
            stall_timeout: Duration::from_secs(f.stall_timeout),
            connections: f.connections,
        },
    })
}

/// Raise the soft limit on open files to the hard limit: a layout keeps
/// one file open per layer, and an image of a thousand parts is past the
/// usual soft limit of 1024. (When the hard limit is reached too, the
/// layout's error names it.)
fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit still stops at the kernel's nr_open.
    let most = limit.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    if let (Some(current), Some(most)) = (limit.current, most)
        && current < most
    {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(most),
                maximum: limit.maximum,
            },
        );
    }
}

/// `--version`: the version, and what this build can read and speak.
fn version() -> String {
    format!(
        "cloudimg {}\nsources: oci: (layout directories), oci-archive: (tars of layouts, read in \
place), registries (http, https with rustls and bundled Mozilla roots; docker:// accepted)\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Run the command line `args` (without the program name); returns the exit code.
pub fn run(program: &str, args: &[String]) -> i32 {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if matches!(args.as_slice(), ["--version" | "-V"]) {
        let _ = write!(std::io::stdout(), "{}", version());
        return 0;
    }
    let cli = match Cli::from_args(&[program], &args) {
        Ok(cli) => cli,
        Err(early) => {
            return match early.status {
                Ok(()) => {
                    let _ = writeln!(std::io::stdout(), "{}", early.output);
                    0
                }
                Err(()) => {
                    let _ = writeln!(std::io::stderr(), "{}", early.output.trim_end());
                    2
                }
            };
        }
    };
    let env = Environment::read();
    let outcome = check_usage(&cli.command).and_then(|()| {
        raise_open_file_limit();
        // serve waits for its signals on a thread of its own (a graceful
        // stop), instead of the handler that cuts every socket at once.
        if !matches!(cli.command, Command::Serve(_)) {
            signals::install();
        }
        match cli.command {
            Command::Copy(a) => copy(a, &env),
            Command::Get(a) => get(a, &env),
            Command::Inspect(a) => inspect(a, &env),
            Command::Pull(a) => pull(a, &env),
            Command::Serve(a) => serve(a, &env),
        }
    });
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            // A signal stops the run whatever error it caused on the way out
            // (a connection the watchdog cut, a retry budget it ended).
            let e = match (e, signals::pending()) {
                (Error::Interrupted(sig), _) | (_, Some(sig)) => Error::Interrupted(sig),
                (e, None) => e,
            };
            // One line, whatever a manifest put into the names it carries.
            let line = crate::inspect::clean(&e.to_string()).into_owned();
            let _ = writeln!(std::io::stderr(), "cloudimg: {line}");
            e.exit_code()
        }
    }
}

fn options(no_verify: bool, env: &Environment) -> Options {
    Options {
        verify: !no_verify,
        kernel_copy: env.io.as_deref() != Some("readwrite"),
        spill_dir: Some(env.temp_dir.clone()),
        ..Options::default()
    }
}

fn summary(verified: bool) -> &'static str {
    if verified {
        "wrote (verified)"
    } else {
        "wrote (digests NOT verified)"
    }
}

/// A source, behind the cache layout when one is asked for.
enum Source {
    Plain(Box<dyn source::BlobSource>),
    Cached(Box<crate::cache::Cached>),
}

impl Source {
    /// Open `reference`; a registry image goes through the cache layout
    /// `cache` when given (a local source needs none and ignores it).
    fn open(
        reference: &Reference,
        opts: &SourceOptions,
        cache: Option<&PathBuf>,
        verified: bool,
    ) -> Result<Source> {
        let inner = source::open(reference, opts)?;
        let (Reference::Registry(name), Some(dir)) = (reference, cache) else {
            return Ok(Source::Plain(inner));
        };
        let store = crate::store::Store::open(dir).map_err(|e| e.context("--cache"))?;
        // Listed under its full name: an epoch-style name under the
        // authority of the server it is relative to.
        let host = match &name.host {
            Some(h) => format!("{h}/"),
            None => {
                let server = opts
                    .registry
                    .epoch_server
                    .as_deref()
                    .unwrap_or(crate::source::registry::DEFAULT_SERVER);
                let rest = server.split_once("://").map_or(server, |(_, rest)| rest);
                let authority = rest.split('/').next().unwrap_or(rest);
                // Never a user name or password written into the server's
                // URL: the layout's names are for anyone to read.
                let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
                format!("{host}/")
            }
        };
        let tag = match (&name.tag, &name.digest) {
            (Some(t), _) => Some(format!("{host}{}:{t}", name.repository)),
            (None, Some(_)) => None,
            (None, None) => Some(format!("{host}{}:latest", name.repository)),
        };
        Ok(Source::Cached(Box::new(crate::cache::Cached::new(
            inner,
            store,
            name.digest.clone(),
            opts.platform.clone(),
            tag,
            verified,
        ))))
    }

    fn get(&self) -> &dyn source::BlobSource {
        match self {
            Source::Plain(s) => &**s,
            Source::Cached(c) => &**c,
        }
    }

    /// A cached blob failed its digest and was removed: the run may start
    /// over, fetching it from the registry, where nothing was delivered.
    fn damaged(&self) -> bool {
        matches!(self, Source::Cached(c) if c.damaged())
    }

    /// After success: the cache keeps what was fetched. Its failure is said
    /// and does not fail the run.
    fn commit(&self) {
        if let Source::Cached(c) = self
            && let Err(e) = c.commit()
        {
            let line = crate::inspect::clean(&e.to_string()).into_owned();
            let _ = writeln!(std::io::stderr(), "cloudimg: cache: not kept: {line}");
        }
    }
}

/// Tell that a run starts over after a damaged cached blob.
fn starting_over(e: &Error) {
    let line = crate::inspect::clean(&e.to_string()).into_owned();
    let _ = writeln!(
        std::io::stderr(),
        "cloudimg: {line}; starting over from the registry"
    );
}

/// `copy`'s DEST: the layout directory and the tag (`None`: SOURCE's).
fn copy_dest(dest: &str) -> Result<(PathBuf, Option<String>)> {
    let usage = |m: String| Err(Error::Usage(m));
    match Reference::parse(dest) {
        Ok(Reference::Layout { dir, selector }) => match selector {
            crate::reference::Selector::Tag(t) => Ok((dir, Some(t))),
            crate::reference::Selector::Default => Ok((dir, None)),
            crate::reference::Selector::Digest(_) => {
                usage(format!("{dest}: a destination takes a tag, not a digest"))
            }
        },
        _ => usage(format!(
            "{dest}: the destination must be an image layout directory, oci:DIR[:TAG]"
        )),
    }
}

fn copy(a: CopyArgs, env: &Environment) -> Result<()> {
    let (dir, tag) = copy_dest(&a.dest)?;
    let reference = Reference::parse(&a.source)?;
    let tag = tag.or_else(|| match &reference {
        Reference::Registry(r) => match (&r.tag, &r.digest) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        },
        Reference::Layout { selector, .. } | Reference::Archive { selector, .. } => {
            match selector {
                crate::reference::Selector::Tag(t) => Some(t.clone()),
                _ => None,
            }
        }
    });
    let source = source::open(&reference, &a.source_options(env)?)?;
    let resolved = source.resolve()?;
    // The image is checked before the layout is touched.
    disk_plan(&resolved.manifest)?;
    let store = crate::store::Store::open(&dir)?;
    let mut progress = Progress::new(0, a.quiet);
    match crate::copy::copy_image(
        &*source,
        &resolved,
        &store,
        tag.as_deref(),
        true,
        &mut progress,
    ) {
        Ok(c) => {
            let dest = match &tag {
                Some(t) => format!("oci:{}:{t}", dir.display()),
                None => format!("oci:{}@{}", dir.display(), resolved.digest),
            };
            let mut what = format!("copied {} into {dest}", plural(c.fetched, "blob"));
            let mut also = Vec::new();
            if c.present > 0 {
                also.push(format!("{} already there", c.present));
            }
            if c.resumed > 0 {
                also.push(format!("{} bytes continued from an earlier run", c.resumed));
            }
            if !also.is_empty() {
                what += &format!(" ({})", also.join(", "));
            }
            progress.finish(&(what + ":"));
            Ok(())
        }
        Err(e) => {
            progress.abandon();
            Err(source.explain(e))
        }
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn get(a: GetArgs, env: &Environment) -> Result<()> {
    let stdout = std::io::stdout();
    // The output is checked before the source is touched: a name that
    // cannot be written fails before anything is fetched.
    let mut target = match &a.output {
        Some(path) => Some(Target::resolve(path)?),
        None if stdout.is_terminal() => {
            return Err(Error::Other(
                "refusing to write a disk image to a terminal; use -o FILE or redirect stdout"
                    .into(),
            ));
        }
        None => None,
    };
    let reference = Reference::parse(&a.source)?;
    let base = options(a.no_verify, env);
    let opts = Options {
        sparse: parse_sparse(&a.sparse)?,
        format: parse_format(&a.format, true)?,
        // A repeated blob is best kept beside the output: on its file
        // system, its copies can be reflinks.
        spill_dir: target
            .as_ref()
            .and_then(|t| t.staging_dir())
            .map(PathBuf::from)
            .or(base.spill_dir.clone()),
        ..base
    };
    let cache = a.cache.as_ref().or(env.cache.as_ref());
    let src = Source::open(&reference, &a.source_options(env)?, cache, opts.verify)?;
    let source = src.get();
    let resolved = source.resolve()?;
    let plan = disk_plan(&resolved.manifest)?;
    if (plan.format, opts.format) == (Format::Qcow2, Some(Format::Raw)) {
        return Err(crate::qcow2::no_raw_from_qcow2());
    }
    let mut first = true;
    loop {
        let mut progress = Progress::new(plan.total, a.quiet);
        let output = match (target.take(), &a.output) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => Some(Target::resolve(path)?),
            (None, None) => None,
        };
        let result = match output {
            Some(target) => target.open().and_then(|out| {
                let sink = Sink::new(out.file().as_fd())?;
                stream::stream_plan(&plan, source, &sink, &opts, &mut progress)?;
                out.commit()
            }),
            None => {
                let sink = Sink::new(stdout.as_fd())?;
                stream::stream_plan(&plan, source, &sink, &opts, &mut progress)
            }
        };
        match result {
            Ok(()) => {
                progress.finish(summary(opts.verify));
                if a.output.is_none() && matches!(src, Source::Cached(_)) {
                    // The reader sees its end now, not after the cache has
                    // fetched what the disk did not need.
                    let _ = std::fs::File::open("/dev/null")
                        .and_then(|null| Ok(rustix::stdio::dup2_stdout(&null)?));
                }
                src.commit();
                return Ok(());
            }
            Err(e) => {
                progress.abandon();
                let e = source.explain(e);
                // Only a file output can start over: nothing of it was
                // delivered.
                if first && a.output.is_some() && src.damaged() && signals::pending().is_none() {
                    starting_over(&e);
                    first = false;
                    continue;
                }
                return Err(e);
            }
        }
    }
}

fn serve(a: ServeArgs, env: &Environment) -> Result<()> {
    let secs = Duration::from_secs;
    crate::serve::run(crate::serve::Config {
        root: a.root,
        listen: a.listen,
        max_connections: a.max_connections,
        verify: !a.no_verify,
        kernel: env.io.as_deref() != Some("readwrite"),
        head_timeout: secs(a.head_timeout),
        idle_timeout: secs(a.idle_timeout),
        send_timeout: secs(a.send_timeout),
        grace: secs(a.grace),
        state: a.state,
    })
}

fn inspect(a: InspectArgs, env: &Environment) -> Result<()> {
    let reference = Reference::parse(&a.source)?;
    let source = source::open(&reference, &a.source_options(env)?)?;
    let report = Report::new(&source.resolve()?);
    let text = if a.json {
        report.to_json() + "\n"
    } else {
        report.to_text()
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(|e| Error::io("writing the report", e))
}

fn pull(a: PullArgs, env: &Environment) -> Result<()> {
    let reference = Reference::parse(&a.source)?;
    let name = a.name.clone().unwrap_or_else(|| reference.default_name());
    if name.is_empty() || name.starts_with('-') || name.chars().any(char::is_control) {
        return Err(Error::Other(format!(
            "{name:?} is not a usable image name (empty, control characters or a leading '-')"
        )));
    }
    let opts = Options {
        format: parse_format(&a.format, false)?,
        ..options(a.no_verify, env)
    };
    let cache = a.cache.as_ref().or(env.cache.as_ref());
    let src = Source::open(&reference, &a.source_options(env)?, cache, opts.verify)?;
    let source = src.get();
    let cocoon = ExecCocoon {
        binary: env.cocoon.clone().unwrap_or_else(|| "cocoon".into()),
    };
    let puller = Puller {
        source,
        cocoon: &cocoon,
    };
    let mut first = true;
    loop {
        let mut progress = Progress::new(0, a.quiet);
        match puller.pull(&name, &opts, &mut progress) {
            Ok(_) => {
                progress.finish(&format!("imported {name:?}:"));
                src.commit();
                return Ok(());
            }
            Err(e) => {
                progress.abandon();
                let e = source.explain(e);
                // cocoon was stopped before it could commit: a new import
                // can start, with the damaged blob from the registry.
                if first && src.damaged() && signals::pending().is_none() {
                    starting_over(&e);
                    first = false;
                    continue;
                }
                return Err(e);
            }
        }
    }
}
