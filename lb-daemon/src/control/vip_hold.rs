//! When a VIP's route goes back into the kernel (for BIRD or FRR to announce) after the
//! VIP had no server up: not at the first server's recovery, but once its services'
//! checks had time to confirm the others too.
//!
//! Directors behind ECMP must hold equal rings for a flow to reach the same server
//! through any of them. A director whose servers come back one check at a time (its link
//! returned, a firewall rule was lifted) would otherwise attract traffic with a ring of
//! one server while the other directors' rings hold all of them. Withdrawal stays
//! immediate (a director with no server must stop attracting traffic at once), and the
//! VIPs up when the routing task starts are announced at once: a restarted daemon finds
//! its routes in place and must not withdraw them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub(super) struct VipHold {
    /// When each VIP up now came up (since this task runs).
    up_since: HashMap<IpAddr, Instant>,
    /// VIPs whose route may be in the kernel.
    announced: BTreeSet<IpAddr>,
    started: bool,
}

impl VipHold {
    /// Of the VIPs up now, those to announce at `now`, and when the next held one is due.
    /// `settle`: how long each VIP must have been up (zero when absent).
    pub(super) fn announce(
        &mut self,
        up: &BTreeSet<IpAddr>,
        settle: &BTreeMap<IpAddr, Duration>,
        now: Instant,
    ) -> (BTreeSet<IpAddr>, Option<Instant>) {
        self.up_since.retain(|vip, _| up.contains(vip));
        self.announced.retain(|vip| up.contains(vip));
        let first = !self.started;
        self.started = true;
        let mut next = None;
        for vip in up {
            let since = *self.up_since.entry(*vip).or_insert(now);
            if first || self.announced.contains(vip) {
                self.announced.insert(*vip);
                continue;
            }
            let due = since + settle.get(vip).copied().unwrap_or_default();
            if due <= now {
                self.announced.insert(*vip);
                tracing::info!(vip = %vip, "VIP up again: its route goes back for announcement");
            } else {
                next = Some(next.map_or(due, |n: Instant| n.min(due)));
            }
        }
        (self.announced.clone(), next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_returning_vip_waits_for_its_settle_time_and_a_lost_one_goes_at_once() {
        let (a, b) = ("192.0.2.10", "192.0.2.11");
        let settle: BTreeMap<IpAddr, Duration> = [(a.parse().unwrap(), Duration::from_millis(500))].into();
        let t0 = Instant::now();
        let mut hold = VipHold::default();
        // At start, what is up is announced at once (a restart keeps its routes).
        assert_eq!(hold.announce(&vips(&[a]), &settle, t0), (vips(&[a]), None));
        // Gone: withdrawn at once.
        assert_eq!(hold.announce(&vips(&[]), &settle, t0), (vips(&[]), None));
        // Back: held until it has been up for its settle time.
        let t1 = t0 + Duration::from_secs(1);
        let due = t1 + Duration::from_millis(500);
        assert_eq!(hold.announce(&vips(&[a]), &settle, t1), (vips(&[]), Some(due)));
        assert_eq!(
            hold.announce(&vips(&[a]), &settle, due - Duration::from_millis(1)),
            (vips(&[]), Some(due))
        );
        assert_eq!(hold.announce(&vips(&[a]), &settle, due), (vips(&[a]), None));
        // Down and up again within the hold restarts it.
        let t2 = due + Duration::from_secs(1);
        hold.announce(&vips(&[]), &settle, t2);
        hold.announce(&vips(&[a]), &settle, t2);
        hold.announce(&vips(&[]), &settle, t2 + Duration::from_millis(400));
        let t3 = t2 + Duration::from_millis(450);
        let (now, next) = hold.announce(&vips(&[a]), &settle, t3);
        assert!(now.is_empty());
        assert_eq!(next, Some(t3 + Duration::from_millis(500)));
        // A VIP without checks (no settle time) comes back at once.
        assert_eq!(
            hold.announce(&vips(&[a, b]), &settle, t3),
            (vips(&[b]), Some(t3 + Duration::from_millis(500)))
        );
    }
}
