//! `Mode`'s wire form round-trips, and its predicates say what each rule needs.

use super::*;

const EXAMPLES: [Mode; 8] = [
    Mode::Sync { backup_workers: 0 },
    Mode::Sync { backup_workers: 2 },
    Mode::Async {
        max_staleness: None,
    },
    Mode::Async {
        max_staleness: Some(3),
    },
    Mode::Ssp { max_lead: 0 },
    Mode::Ssp { max_lead: 4 },
    Mode::Buffered {
        k: 10,
        max_staleness: None,
    },
    Mode::Buffered {
        k: MAX_BUFFER,
        max_staleness: Some(40),
    },
];

#[test]
fn every_mode_reads_back_from_its_wire_form() {
    for mode in EXAMPLES {
        let (tag, param) = mode.to_wire();
        assert_eq!(Mode::from_wire(tag, param), Some(mode), "{mode}");
    }
    assert_eq!(Mode::from_wire(0, 0), None);
    assert_eq!(Mode::from_wire(4, 7), None, "a buffer of none");
    assert_eq!(
        Mode::from_wire(4, u64::MAX),
        None,
        "a buffer past the limit"
    );
    assert_eq!(Mode::from_wire(200, 1), None);
    // Different kinds never share a tag.
    for a in EXAMPLES {
        for b in EXAMPLES {
            if a.name() != b.name() {
                assert_ne!(a.to_wire().0, b.to_wire().0, "{a} and {b}");
            }
        }
    }
}

#[test]
fn predicates_follow_each_rule() {
    let sync = Mode::Sync { backup_workers: 1 };
    let asynchronous = Mode::Async {
        max_staleness: Some(2),
    };
    let ssp = Mode::Ssp { max_lead: 2 };
    assert!(sync.lockstep() && sync.step_is_version() && sync.pull_waits());
    assert!(!asynchronous.lockstep() && !asynchronous.pull_waits());
    assert!(ssp.lockstep() && !ssp.step_is_version() && ssp.pull_waits());
    assert_eq!((sync.backup_workers(), ssp.backup_workers()), (1, 0));
    assert!(sync.coordinated(2) && !sync.coordinated(1) && !ssp.coordinated(2));
    let buffered = Mode::Buffered {
        k: 4,
        max_staleness: None,
    };
    assert!(!buffered.lockstep() && !buffered.pull_waits() && !buffered.coordinated(2));
    assert_eq!(buffered.spec().gradients_per_update, 4);
}
