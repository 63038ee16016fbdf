//! The command line: `get`, `inspect`, `pull`. Parses with argh, runs the
//! library, and turns the outcome into one stderr line and an exit code
//! (0 success, 1 failure, 2 usage, 128+N after signal N).

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
use crate::pull::{ExecCocoon, Puller};
use crate::reference::Reference;
use crate::route::Sparse;
use crate::sink::Sink;
use crate::source::registry::RegistryOptions;
use crate::source::registry::auth::{Credentials, Secret};
use crate::source::{SourceOptions, parse_platform};
use crate::stream::{self, Options};
use crate::{signals, source};

#[derive(FromArgs, Debug)]
#[argh(
    description = "Stream an OCI-packaged cloud image (a VM disk, often split into parts) out of an \
OCI registry or image layout, verified, into a file, a pipe, or `cocoon image import` — with the \
kernel doing the copying.",
    note = "SOURCE is an OCI image layout, oci:DIR[:TAG] or oci:DIR@sha256:HEX (the tag follows \
the last colon unless that part holds a '/': spell the tag out when DIR has a colon, \
oci:/srv/a:b:latest), or a registry reference [HOST[:PORT]/]REPO[:TAG][@DIGEST] (no HOST: \
relative to $EPOCH_SERVER; https except for loopback hosts and --plain-http).\n\
Environment: EPOCH_SERVER (default http://127.0.0.1:8080), EPOCH_REGISTRY_TOKEN (bearer for \
EPOCH_SERVER only), EPOCH_CA_CERT (extra PEM CA), EPOCH_COCOON_BINARY (cocoon for `pull`), \
DOCKER_CONFIG (credentials), CLOUDIMG_MIRRORS (comma-separated mirror URLs), \
CLOUDIMG_CHUNK_SIZE (bytes per range request), CLOUDIMG_IO=readwrite (portable I/O path).\n\
Exit status: 0 success, 1 failure (one `cloudimg: …` line on stderr), 2 usage error, \
130/143 after SIGINT/SIGTERM.",
    example = "{command_name} inspect oci:./win11:25h2\n\
{command_name} get oci:./win11:25h2 -o win11.qcow2\n\
{command_name} get oci:./win11:25h2 | qemu-img convert -f qcow2 -O raw /dev/stdin disk.raw\n\
{command_name} pull oci:./win11:25h2 --name win11\n\
{command_name} pull windows/win11:25h2\n\
{command_name} get ghcr.io/org/ubuntu:24.04 --platform linux/arm64 -o ubuntu.qcow2"
)]
struct Cli {
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Command {
    Get(GetArgs),
    Inspect(InspectArgs),
    Pull(PullArgs),
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
            /// seconds without a byte before a connection counts as stalled (default 60)
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

            fn source_options(&self) -> Result<SourceOptions> {
                source_options(self.source_flags())
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
error, size or digest mismatch, SIGINT/SIGTERM) cocoon's process group is killed before its stdin \
is closed: a broken or unverified image is never committed.\n\
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
    }
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
pub const ENV_MIRRORS: &str = "CLOUDIMG_MIRRORS";
/// Environment variable overriding the bytes per range request (tuning).
pub const ENV_CHUNK: &str = "CLOUDIMG_CHUNK_SIZE";

/// Flag values that cannot work, found before anything runs: a usage error
/// (exit 2), one line.
fn check_source_flags(f: &SourceFlags<'_>) -> std::result::Result<(), String> {
    if let Some(p) = f.platform {
        parse_platform(p).map_err(|e| e.to_string())?;
    }
    match (f.username, f.password_stdin) {
        (Some(_), true) | (None, false) => {}
        (Some(_), false) => {
            return Err(
                "--username needs --password-stdin (the password is read from stdin)".into(),
            );
        }
        (None, true) => return Err("--password-stdin needs --username".into()),
    }
    for m in f.mirrors {
        check_mirror(m)?;
    }
    if f.connections == Some(0) {
        return Err("--connections must be at least 1".into());
    }
    if f.stall_timeout == 0 {
        return Err("--stall-timeout must be at least 1 second".into());
    }
    Ok(())
}

fn check_mirror(m: &str) -> std::result::Result<(), String> {
    if m.starts_with("http://") || m.starts_with("https://") {
        Ok(())
    } else {
        Err(format!(
            "mirror {m:?} must be an http:// or https:// base URL"
        ))
    }
}

fn parse_sparse(s: &str) -> std::result::Result<Sparse, String> {
    match s {
        "auto" => Ok(Sparse::Auto),
        "always" => Ok(Sparse::Always),
        "never" => Ok(Sparse::Never),
        other => Err(format!(
            "--sparse {other:?}: expected auto, always or never"
        )),
    }
}

/// `--format`: `None` for auto (where allowed), else the format.
fn parse_format(s: &str, auto: bool) -> std::result::Result<Option<Format>, String> {
    match s {
        "auto" if auto => Ok(None),
        "qcow2" => Ok(Some(Format::Qcow2)),
        "raw" => Ok(Some(Format::Raw)),
        other if auto => Err(format!("--format {other:?}: expected auto, qcow2 or raw")),
        other => Err(format!("--format {other:?}: expected qcow2 or raw")),
    }
}

/// The first usage error in the command's flag values, if any.
fn usage_error(command: &Command) -> Option<String> {
    let checked = match command {
        Command::Get(a) => parse_sparse(&a.sparse)
            .and_then(|_| parse_format(&a.format, true))
            .and_then(|_| check_source_flags(&a.source_flags())),
        Command::Inspect(a) => check_source_flags(&a.source_flags()),
        Command::Pull(a) => {
            parse_format(&a.format, false).and_then(|_| check_source_flags(&a.source_flags()))
        }
    };
    checked.err()
}

/// Flags already passed [`check_source_flags`].
fn source_options(f: SourceFlags<'_>) -> Result<SourceOptions> {
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
        && let Ok(env) = std::env::var(ENV_MIRRORS)
    {
        mirrors = env
            .split([',', ' '])
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect();
        for m in &mirrors {
            check_mirror(m).map_err(|e| Error::Other(format!("{ENV_MIRRORS}: {e}")))?;
        }
    }
    let chunk_size = match std::env::var(ENV_CHUNK) {
        Ok(v) => v
            .parse::<u64>()
            .ok()
            .filter(|&n| n >= 4096)
            .ok_or_else(|| Error::Other(format!("{ENV_CHUNK}={v:?}: want a byte count >= 4096")))?,
        Err(_) => RegistryOptions::default().chunk_size,
    };
    Ok(SourceOptions {
        platform,
        registry: RegistryOptions {
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

/// Run the command line `args` (without the program name); returns the exit code.
pub fn run(program: &str, args: &[String]) -> i32 {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
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
    if let Some(message) = usage_error(&cli.command) {
        let _ = writeln!(
            std::io::stderr(),
            "cloudimg: {}",
            crate::inspect::clean(&message)
        );
        return 2;
    }
    raise_open_file_limit();
    signals::install();
    let outcome = match cli.command {
        Command::Get(a) => get(a),
        Command::Inspect(a) => inspect(a),
        Command::Pull(a) => pull(a),
    };
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

/// Environment knob that forces the portable read/write path (for tests and
/// benchmarks of the fallback).
const ENV_IO: &str = "CLOUDIMG_IO";

fn options(no_verify: bool) -> Options {
    Options {
        verify: !no_verify,
        kernel_copy: std::env::var(ENV_IO).map_or(true, |v| v != "readwrite"),
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

fn get(a: GetArgs) -> Result<()> {
    let stdout = std::io::stdout();
    // The output is checked before the source is touched: a name that
    // cannot be written fails before anything is fetched.
    let target = match &a.output {
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
    let opts = Options {
        sparse: parse_sparse(&a.sparse).map_err(Error::Other)?,
        format: parse_format(&a.format, true).map_err(Error::Other)?,
        ..options(a.no_verify)
    };
    let source = source::open(&reference, &a.source_options()?)?;
    let resolved = source.resolve()?;
    let plan = disk_plan(&resolved.manifest)?;
    if (plan.format, opts.format) == (Format::Qcow2, Some(Format::Raw)) {
        return Err(crate::qcow2::no_raw_from_qcow2());
    }
    let mut progress = Progress::new(plan.total, a.quiet);
    let result = match target {
        Some(target) => target.open().and_then(|out| {
            let sink = Sink::new(out.file().as_fd())?;
            stream::stream_plan(&plan, &*source, &sink, &opts, &mut progress)?;
            out.commit()
        }),
        None => {
            let sink = Sink::new(stdout.as_fd())?;
            stream::stream_plan(&plan, &*source, &sink, &opts, &mut progress)
        }
    };
    match result {
        Ok(()) => {
            progress.finish(summary(opts.verify));
            Ok(())
        }
        Err(e) => {
            progress.abandon();
            Err(e)
        }
    }
}

fn inspect(a: InspectArgs) -> Result<()> {
    let reference = Reference::parse(&a.source)?;
    let source = source::open(&reference, &a.source_options()?)?;
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

fn pull(a: PullArgs) -> Result<()> {
    let reference = Reference::parse(&a.source)?;
    let name = a.name.clone().unwrap_or_else(|| reference.default_name());
    if name.is_empty() || name.starts_with('-') || name.chars().any(char::is_control) {
        return Err(Error::Other(format!(
            "{name:?} is not a usable image name (empty, control characters or a leading '-')"
        )));
    }
    let source = source::open(&reference, &a.source_options()?)?;
    let cocoon = ExecCocoon::from_env();
    let opts = Options {
        format: parse_format(&a.format, false).map_err(Error::Other)?,
        ..options(a.no_verify)
    };
    let mut progress = Progress::new(0, a.quiet);
    let puller = Puller {
        source: &*source,
        cocoon: &cocoon,
    };
    match puller.pull(&name, &opts, &mut progress) {
        Ok(_) => {
            progress.finish(&format!("imported {name:?}:"));
            Ok(())
        }
        Err(e) => {
            progress.abandon();
            Err(e)
        }
    }
}
