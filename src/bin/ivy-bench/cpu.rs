//! What each side of a run took: the server's and the tool's CPU time, and the machine's idle
//! and stolen shares over the measured window, read from `/proc`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets the load run one second to warm up, then counts what `counter` gains over `seconds`;
/// returns (count, seconds measured, the CPU spent meanwhile).
pub(crate) async fn measure_window(counter: &AtomicU64, seconds: u64) -> (u64, f64, CpuUse) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let warm = counter.load(Ordering::Relaxed);
    let cpu = CpuMeter::start();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu = cpu.stop();
    (counter.load(Ordering::Relaxed) - warm, cpu.secs, cpu)
}

/// The server's process id, when known (`main` sets it once).
pub(crate) static SERVER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// CPU time over a measured window: the server's, the tool's and the machine's idle share, read
/// from `/proc`. The tool shares the cores with the server, so every report says what each took:
/// a run in which the tool takes most of the CPU measures the tool, not the server.
pub(crate) struct CpuMeter {
    from: CpuSample,
    wall: Instant,
}

/// What `CpuMeter::stop` measured.
pub(crate) struct CpuUse {
    from: CpuSample,
    to: CpuSample,
    /// The window's length.
    secs: f64,
}

#[derive(Clone, Copy)]
struct CpuSample {
    /// (user, system) clock ticks of each process.
    server: Option<(u64, u64)>,
    tool: Option<(u64, u64)>,
    /// Ticks of all cores.
    machine: Option<MachineTicks>,
}

impl CpuSample {
    fn now() -> CpuSample {
        CpuSample {
            server: SERVER_PID
                .get()
                .and_then(|pid| process_ticks(&pid.to_string())),
            tool: process_ticks("self"),
            machine: machine_ticks(),
        }
    }
}

/// utime and stime of `/proc/PID/stat` (fields 14 and 15, counted after the parenthesised name,
/// which may hold spaces).
fn process_ticks(pid: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// The `cpu` line of `/proc/stat`, summed over the cores.
#[derive(Clone, Copy, Debug, PartialEq)]
struct MachineTicks {
    /// Idle and iowait.
    idle: u64,
    /// Time the hypervisor gave this VM's cores to someone else. On the shared VMs this is
    /// measured on it ranged from 0 to 28% of a paced `fanout` run, whose p99 went from about
    /// 11 to 119 ms: a run with much of it measured the neighbours.
    steal: u64,
    total: u64,
}

fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    // guest and guest_nice (after steal) are already counted in user and nice.
    Some(MachineTicks {
        idle: ticks.get(3)? + ticks.get(4)?,
        steal: *ticks.get(7)?,
        total: ticks.iter().take(8).sum(),
    })
}

impl CpuMeter {
    pub(crate) fn start() -> CpuMeter {
        CpuMeter {
            from: CpuSample::now(),
            wall: Instant::now(),
        }
    }

    pub(crate) fn stop(self) -> CpuUse {
        CpuUse {
            from: self.from,
            to: CpuSample::now(),
            secs: self.wall.elapsed().as_secs_f64(),
        }
    }
}

impl CpuUse {
    /// `/proc` counts in USER_HZ ticks, 100 a second on Linux (10 ms: a window of seconds is
    /// needed for a useful figure).
    const TICKS_PER_SEC: f64 = 100.0;

    /// Prints the CPU each side took, in cores and per `unit` (`units` done in the window).
    pub(crate) fn report(&self, units: u64, unit: &str) {
        let to = self.to;
        let per = |ticks: u64| {
            let secs = ticks as f64 / Self::TICKS_PER_SEC;
            let per_unit = if units == 0 {
                0.0
            } else {
                secs * 1e6 / units as f64
            };
            (secs / self.secs, per_unit)
        };
        let mut parts = Vec::new();
        for (name, from, to) in [
            ("server", self.from.server, to.server),
            ("ivy-bench", self.from.tool, to.tool),
        ] {
            if let (Some((u0, s0)), Some((u1, s1))) = (from, to) {
                let (cores, us) = per((u1 + s1).saturating_sub(u0 + s0));
                let (user, _) = per(u1.saturating_sub(u0));
                parts.push(format!(
                    "{name} {cores:.2} cores ({user:.2} user), {us:.2} us/{unit}"
                ));
            }
        }
        if let (Some(m0), Some(m1)) = (self.from.machine, to.machine) {
            let share = |from: u64, to: u64| {
                100.0 * to.saturating_sub(from) as f64
                    / m1.total.saturating_sub(m0.total).max(1) as f64
            };
            parts.push(format!(
                "machine {:.0}% idle, {:.0}% stolen",
                share(m0.idle, m1.idle),
                share(m0.steal, m1.steal)
            ));
        }
        say!("cpu: {}", parts.join("; "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_from_proc() {
        let (user0, sys0) = process_ticks("self").expect("own /proc/self/stat");
        let m = machine_ticks().expect("/proc/stat");
        assert!(m.idle + m.steal <= m.total, "{m:?}");
        // Half a second of spinning is about 50 ticks of user time.
        let until = Instant::now() + Duration::from_millis(500);
        let mut n = 0u64;
        while Instant::now() < until {
            n = std::hint::black_box(n.wrapping_add(1));
        }
        let (user1, sys1) = process_ticks("self").expect("own /proc/self/stat");
        assert!(
            user1 + sys1 > user0 + sys0,
            "{user0}+{sys0} -> {user1}+{sys1}"
        );
        assert_eq!(process_ticks("0"), None, "no such process");
    }
}
