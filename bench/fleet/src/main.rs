//! `waypost-fleet`: the fleet simulator (see `waypost_fleet::fleet`), e.g.
//! `waypost-fleet --spawn-server --instances 10000`, or against two replicas sharing a database:
//! `waypost-fleet --spawn-server --replicas 2 --database postgres://USER@HOST:PORT/DB`.

use clap::Parser as _;

fn main() {
    let args = waypost_fleet::fleet::FleetArgs::parse();
    let code = match waypost_fleet::fleet::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line, whatever the error chain holds (as `waypost` prints its errors).
            eprintln!(
                "waypost-fleet: error: {}",
                format!("{e:#}").replace('\n', " ")
            );
            1
        }
    };
    std::process::exit(code);
}
