//! What the host checks of a run that ended with the guest's exit: every scan whose checksum
//! can be checked (a fill scan) finished and read the checksum its fill pattern gives. A
//! guest that exits 0 after reading wrong memory must not look like a success.

use guest_abi::TaskKind;
use vmm::RunReport;
use vmm::clones::ClonesReport;
use vmm::report::{TaskReport, TaskState};

use crate::status;

/// Why the host does not accept the memory the guest read (empty: it does).
pub fn problems(tasks: &[TaskReport]) -> Vec<String> {
    let mut bad = Vec::new();
    for t in tasks {
        let kind = t
            .kind
            .map_or_else(|| "?".to_string(), |k| format!("{k:?}").to_lowercase());
        match t.checksum_ok {
            Some(false) if t.state == TaskState::Done => bad.push(format!(
                "task {} ({kind}) read memory whose checksum {:#x} is not its fill pattern's",
                t.index, t.checksum
            )),
            Some(_) if t.state != TaskState::Done => {
                bad.push(format!(
                    "task {} ({kind}) did not finish: its checksum was not checked",
                    t.index
                ));
            }
            None if t.kind == Some(TaskKind::Scan) && t.state != TaskState::Done => {
                bad.push(format!("task {} ({kind}) did not finish", t.index));
            }
            _ => {}
        }
    }
    bad
}

/// The exit status of a run that ended with the guest's exit: the guest's when not 0, else
/// [`status::CHECK_FAILED`] when the host's checks failed (each problem printed on stderr),
/// else 0. A run that ended with a snapshot is not checked (its tasks are mid-way).
pub fn exit_status(report: &RunReport) -> u8 {
    if report.snapshot.is_some() {
        return 0;
    }
    let problems = problems(&report.tasks);
    for p in &problems {
        eprintln!("apfvm: check failed: {p}");
    }
    match (report.exit_status, problems.is_empty()) {
        (0, true) => 0,
        (0, false) => {
            eprintln!(
                "apfvm: the guest exited 0 but its memory failed the host's check: exit status {}",
                status::CHECK_FAILED
            );
            status::CHECK_FAILED
        }
        (s, _) => status::of_guest(s),
    }
}

/// The exit status of `restore --clones`: an error when a clone's run ended in one (the
/// same error from every clone, as a failing source gives, is said once); else the first
/// clone whose guest failed or whose memory failed the host's check gives its status
/// (problems printed per clone); else 0.
pub fn clones_exit_status(report: &ClonesReport) -> anyhow::Result<u8> {
    let errors: Vec<(usize, &str)> = report
        .clones
        .iter()
        .filter_map(|c| c.error.as_deref().map(|e| (c.index, e)))
        .collect();
    if let Some(&(_, first)) = errors.first() {
        if errors.len() == report.clones.len() && errors.iter().all(|&(_, e)| e == first) {
            anyhow::bail!("every clone stopped: {first}");
        }
        let each: Vec<String> = errors
            .iter()
            .map(|(i, e)| format!("clone {i}: {e}"))
            .collect();
        anyhow::bail!(
            "{} of {} clones failed:\n  {}",
            errors.len(),
            report.clones.len(),
            each.join("\n  ")
        );
    }
    let mut status = 0;
    for c in &report.clones {
        for p in problems(&c.tasks) {
            eprintln!("apfvm: check failed: clone {}: {p}", c.index);
            if status == 0 {
                status = status::CHECK_FAILED;
            }
        }
        if let Some(s) = c.exit_status.filter(|&s| s != 0)
            && status == 0
        {
            status = status::of_guest(s);
        }
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(
        index: usize,
        kind: TaskKind,
        state: TaskState,
        checksum_ok: Option<bool>,
    ) -> TaskReport {
        TaskReport {
            index,
            kind: Some(kind),
            cpu: 0,
            state,
            exit_code: 0,
            work: 1,
            checksum: 0x1234,
            checksum_ok,
            apf_sleeps: 0,
            ran_while_token_outstanding: 0,
            run_us: 1,
        }
    }

    #[test]
    fn a_bad_or_unfinished_checked_scan_is_a_problem() {
        let good = [
            task(0, TaskKind::Compute, TaskState::Done, None),
            task(1, TaskKind::Scan, TaskState::Done, Some(true)),
        ];
        assert!(problems(&good).is_empty());
        let bad = problems(&[task(3, TaskKind::Scan, TaskState::Done, Some(false))]);
        assert_eq!(
            bad,
            ["task 3 (scan) read memory whose checksum 0x1234 is not its fill pattern's"]
        );
        let unfinished = problems(&[task(2, TaskKind::Scan, TaskState::Running, Some(false))]);
        assert_eq!(
            unfinished,
            ["task 2 (scan) did not finish: its checksum was not checked"]
        );
        assert_eq!(
            problems(&[task(4, TaskKind::Scan, TaskState::New, None)]).len(),
            1
        );
        assert!(problems(&[task(5, TaskKind::Compute, TaskState::Running, None)]).is_empty());
    }
}
