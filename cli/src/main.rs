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
    Sign(firebreak_cli::sign::SignArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Sign(args) => firebreak_cli::sign::run(args).map(|out| print!("{out}")),
    };
    if let Err(message) = result {
        eprintln!("firebreak: {message}");
        std::process::exit(2);
    }
}
