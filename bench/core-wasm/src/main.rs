//! Reads the coreloop input on stdin, writes its result on stdout.
#[path = "../../tool/src/coreloop.rs"]
mod coreloop;

fn main() {
    let mut input = String::new();
    if std::io::Read::read_to_string(&mut std::io::stdin(), &mut input).is_err() {
        std::process::exit(2);
    }
    match coreloop::run(&input) {
        Ok(out) => println!("{out}"),
        Err(e) => {
            eprintln!("core-wasm: {e}");
            std::process::exit(1);
        }
    }
}
