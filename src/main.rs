//! The `cloudimg` binary: everything lives in the library's [`cloudimg::cli`].

fn main() {
    let mut args = std::env::args();
    let program = args.next().unwrap_or_else(|| "cloudimg".to_owned());
    let program = program.rsplit('/').next().unwrap_or("cloudimg").to_owned();
    let rest: Vec<String> = args.collect();
    std::process::exit(cloudimg::cli::run(&program, &rest));
}
