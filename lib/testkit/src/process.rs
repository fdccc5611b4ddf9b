//! Child processes that lead their own process group (`process_group(0)`): a launcher script
//! and the server it starts (a JVM, beam) die together.

use std::process::{Child, Command, Stdio};

/// SIGKILLs the whole process group `child` leads, then reaps `child`.
///
/// The `--` matters: procps-ng's `kill -KILL -1234` reads `-1234` as an option and signals
/// process group **1** (`kill(-1, SIGKILL)`: every process on the machine), or group 3 for
/// `-3775`. Only `kill -KILL -- -1234` signals group 1234.
pub fn kill_group(child: &mut Child) {
    let pgid = child.id();
    // A group id of 0 or 1 would mean "our own group" or "everyone": never ours to kill.
    if pgid > 1 {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::time::Duration;

    use super::*;

    fn gone(pid: u32) -> bool {
        // Gone, or a zombie waiting for whoever adopted it.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    }

    #[test]
    fn the_whole_group_dies_and_nothing_else() {
        // A launcher that starts a grandchild and waits for it, like the emulator's script.
        let mut child = Command::new("sh")
            .args(["-c", "sleep 60 & echo $!; wait"])
            .process_group(0)
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let grandchild: u32 = line.trim().parse().unwrap();
        // A bystander in another group must survive.
        let mut bystander = Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .expect("sleep");

        kill_group(&mut child);

        assert!(
            crate::wait_until(Duration::from_secs(10), || gone(grandchild)),
            "the grandchild {grandchild} outlived its group"
        );
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "a process outside the group was killed"
        );
        let _ = bystander.kill();
        let _ = bystander.wait();
    }
}
