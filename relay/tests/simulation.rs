//! The recovery protocol under a deterministic simulation (see `sim/`): every seed a schedule
//! of strands, relays, API outages, kills and pauses in virtual time, the invariants checked
//! after every step. `SIM_SCHEDULES=N` runs more (default 10,000); `SIM_SEED=S` replays one
//! schedule and prints what it did. A failure prints its seed.

mod sim;

use sim::Config;
use sim::model::Defects;

fn schedules() -> u64 {
    std::env::var("SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

/// The first seed in `seeds` whose schedule breaks an invariant, with what broke.
fn first_failure(seeds: std::ops::Range<u64>, config: Config) -> Option<(u64, String)> {
    seeds
        .into_iter()
        .find_map(|seed| sim::run(seed, config).err().map(|e| (seed, e)))
}

#[test]
fn every_schedule_keeps_the_invariants() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        let result = sim::run_traced(seed, Config::default(), true);
        println!("seed {seed}: {result:?}");
        assert!(result.is_ok(), "seed {seed}: {result:?}");
        return;
    }
    let n = schedules();
    let started = std::time::Instant::now();
    // Seeds are independent: every core takes every k-th one.
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    let results: Vec<Vec<(u64, Result<sim::Stats, String>)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..cores)
            .map(|k| {
                s.spawn(move || {
                    (k..n)
                        .step_by(cores as usize)
                        .map(|seed| (seed, sim::run(seed, Config::default())))
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a simulation thread"))
            .collect()
    });
    let mut outcomes = std::collections::BTreeMap::new();
    let (mut kills, mut executions, mut virtual_s, mut late) = (0, 0, 0u64, 0);
    let mut all: Vec<_> = results.into_iter().flatten().collect();
    all.sort_by_key(|(seed, _)| *seed);
    for (seed, result) in all {
        match result {
            Ok(stats) => {
                kills += stats.kills;
                executions += stats.executions;
                virtual_s += stats.virtual_seconds;
                late += stats.late_overwrites;
                for (o, k) in stats.outcomes {
                    *outcomes.entry(o).or_insert(0) += k;
                }
            }
            Err(e) => panic!("seed {seed} broke an invariant (replay: SIM_SEED={seed}): {e}"),
        }
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "simulation: {n} schedules in {took:.1} s ({:.0}/s), {executions} executions, {kills} relay kills, \
         {:.0} virtual hours; outcomes {outcomes:?}; late marks over a completion (the \
         documented window of an API applying after the relay gave up): {late}",
        n as f64 / took,
        virtual_s as f64 / 3600.0
    );
    // Every branch was taken: a simulation that never marks or never re-fires shows nothing.
    for o in [
        "marked_error",
        "already_terminal",
        "gone",
        "rearmed",
        "refired",
    ] {
        assert!(
            outcomes.get(o).is_some_and(|k| *k > 0),
            "no {o} in {outcomes:?}"
        );
    }
}

/// The simulation finds each defect fixed in earlier rounds (and each way a re-fire could lose
/// the execution's handle or fire twice) when it is put back.
#[test]
fn the_simulation_finds_the_defects_of_earlier_rounds() {
    let budget = schedules().min(2_000);
    let defect = |d: Defects| Config {
        defects: d,
        ..Config::default()
    };
    let none = Defects::default();
    let defects = [
        (
            "no settle delay",
            Config {
                no_settle_delay: true,
                ..Config::default()
            },
        ),
        (
            "resolve without the claim's fence",
            defect(Defects {
                unfenced_resolve: true,
                ..none
            }),
        ),
        (
            "a re-offer that waits on a locked row",
            defect(Defects {
                reoffer_waits: true,
                ..none
            }),
        ),
        (
            "a re-fire that removes the barrier at once",
            defect(Defects {
                refire_removes_barrier: true,
                ..none
            }),
        ),
        (
            "a re-fire that leaves no stamp",
            defect(Defects {
                refire_unstamped: true,
                ..none
            }),
        ),
    ];
    for (name, config) in defects {
        let found = first_failure(0..budget, config);
        println!("{name}: {found:?}");
        assert!(found.is_some(), "{name}: not found in {budget} schedules");
    }
}
