//! `firebreak`: the command-line side of Firebreak.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "firebreak", version, about = "Firebreak: sign requests, fingerprint secrets, lint configuration")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print RFC 9421 signature headers (and Content-Digest) for a request.
    Sign(Box<firebreak_cli::sign::SignArgs>),
    /// Print the SHA-256 fingerprint of a secret read from standard input (one trailing newline
    /// is stripped) for env-guard's `protected_credentials`.
    Fingerprint(firebreak_cli::fingerprint::FingerprintArgs),
    /// Scan configuration files for protected production credentials: prints `file:line: label
    /// (how found)`; exits 1 when anything is found, 0 when clean, 2 on usage or config errors.
    Lint(firebreak_cli::lint::LintArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Sign(args) => firebreak_cli::sign::run(args).map(|out| print!("{out}")),
        Command::Fingerprint(args) => firebreak_cli::fingerprint::run(args).map(|out| print!("{out}")),
        Command::Lint(args) => firebreak_cli::lint::run(args).map(|(out, code)| {
            print!("{out}");
            if code != 0 {
                std::process::exit(code);
            }
        }),
    };
    if let Err(message) = result {
        eprintln!("firebreak: {message}");
        std::process::exit(2);
    }
}
