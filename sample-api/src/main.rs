//! pg-reaper-sample-api: the sample status API as a program (for `make run` and the package
//! test); see the library for what it answers.

use clap::Parser;

fn main() {
    let args = pg_reaper_sample_api::Args::parse();
    match pg_reaper_sample_api::start(args) {
        Ok(running) => {
            eprintln!(
                "sample status API listening on {}://{}",
                running.scheme, running.addr
            );
            // It serves on its own runtime until the process is ended.
            loop {
                std::thread::park();
            }
        }
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2)
        }
    }
}
