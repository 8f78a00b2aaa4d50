//! Per-node vCPU load, kept up to date from the VM watch and from the placements the
//! operator made that the watch has not shown yet, so placing a VM costs O(nodes) instead
//! of a scan of every VM (which made a burst of N new VMs cost O(N²): 10,000 VMs stalled).

use corescale_api::VirtualMachine;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// What counts of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// `status.nodeName` as the watch shows it.
    node: Option<String>,
    /// `spec.cpus`.
    cpus: u32,
}

/// The load index (behind [`NodeLoad`]'s lock).
#[derive(Debug, Default)]
pub struct Loads {
    /// Every VM the watch shows.
    seen: HashMap<ObjectRef<VirtualMachine>, Seen>,
    /// Placements decided here that the watch does not show yet (node per VM).
    placed: HashMap<ObjectRef<VirtualMachine>, String>,
    /// vCPUs per node: the sum over VMs of `spec.cpus` on their effective node.
    nodes: HashMap<String, u64>,
    /// Objects of a relist in progress (the watch restarted).
    relist: Option<HashMap<ObjectRef<VirtualMachine>, Seen>>,
}

fn seen_of(vm: &VirtualMachine) -> Seen {
    Seen {
        node: vm.status.as_ref().and_then(|s| s.node_name.clone()),
        cpus: vm.spec.cpus,
    }
}

impl Loads {
    /// The node a VM counts on: a placement not yet shown wins over what the watch shows.
    fn node_of(&self, r: &ObjectRef<VirtualMachine>) -> Option<(&str, u32)> {
        let s = self.seen.get(r)?;
        let node = self.placed.get(r).or(s.node.as_ref())?;
        Some((node.as_str(), s.cpus))
    }

    fn add(&mut self, r: &ObjectRef<VirtualMachine>, sign: i64) {
        if let Some((node, cpus)) = self.node_of(r) {
            let node = node.to_string();
            let total = self.nodes.entry(node.clone()).or_insert(0);
            *total = total.saturating_add_signed(sign * i64::from(cpus));
            if *total == 0 {
                self.nodes.remove(&node);
            }
        }
    }

    /// Change what counts of one VM, keeping the per-node sums right.
    fn update(&mut self, r: &ObjectRef<VirtualMachine>, f: impl FnOnce(&mut Self)) {
        self.add(r, -1);
        f(self);
        self.add(r, 1);
    }

    /// Apply one event of the VM watch.
    pub fn observe(&mut self, event: &watcher::Event<VirtualMachine>) {
        match event {
            watcher::Event::Apply(vm) => {
                let r = ObjectRef::from_obj(vm);
                let s = seen_of(vm);
                self.update(&r, |l| {
                    // The watch caught up with our placement: it alone counts now.
                    if s.node.is_some() && l.placed.get(&r) == s.node.as_ref() {
                        l.placed.remove(&r);
                    }
                    l.seen.insert(r.clone(), s);
                });
            }
            watcher::Event::Delete(vm) => {
                let r = ObjectRef::from_obj(vm);
                self.update(&r, |l| {
                    l.seen.remove(&r);
                    l.placed.remove(&r);
                });
            }
            watcher::Event::Init => self.relist = Some(HashMap::new()),
            watcher::Event::InitApply(vm) => {
                if let Some(m) = self.relist.as_mut() {
                    m.insert(ObjectRef::from_obj(vm), seen_of(vm));
                }
            }
            watcher::Event::InitDone => {
                if let Some(m) = self.relist.take() {
                    self.seen = m;
                    let seen = &self.seen;
                    self.placed.retain(|r, _| seen.contains_key(r));
                    self.recount();
                }
            }
        }
    }

    fn recount(&mut self) {
        self.nodes.clear();
        let refs: Vec<_> = self.seen.keys().cloned().collect();
        for r in refs {
            self.add(&r, 1);
        }
    }

    /// The operator placed `vm` on `node` (its status write may not be seen yet).
    pub fn place(&mut self, vm: &VirtualMachine, node: &str) {
        let r = ObjectRef::from_obj(vm);
        self.update(&r, |l| {
            l.seen.entry(r.clone()).or_insert_with(|| seen_of(vm));
            l.placed.insert(r.clone(), node.to_string());
        });
    }

    /// Forget a placement not yet seen (the VM is gone or released).
    pub fn forget(&mut self, vm: &VirtualMachine) {
        let r = ObjectRef::from_obj(vm);
        self.update(&r, |l| {
            l.placed.remove(&r);
        });
    }

    /// vCPUs wanted per node by every VM but `vm`, O(nodes).
    pub fn except(&self, vm: &VirtualMachine) -> BTreeMap<String, u32> {
        let mut load: BTreeMap<String, u32> = self
            .nodes
            .iter()
            .map(|(n, v)| (n.clone(), u32::try_from(*v).unwrap_or(u32::MAX)))
            .collect();
        if let Some((node, cpus)) = self.node_of(&ObjectRef::from_obj(vm)) {
            if let Some(v) = load.get_mut(node) {
                *v = v.saturating_sub(cpus);
            }
        }
        load
    }
}

/// [`Loads`] behind a lock: placement holds it from reading the load to reserving the
/// node, so concurrent reconciles of a burst never all see the same load.
#[derive(Debug, Default)]
pub struct NodeLoad(Mutex<Loads>);

impl NodeLoad {
    /// Lock the index (a panic while it was held cannot leave the sums half-updated:
    /// every change is one `update`).
    pub fn lock(&self) -> MutexGuard<'_, Loads> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use watcher::Event;

    fn vm(name: &str, cpus: u32, node: Option<&str>) -> VirtualMachine {
        let status = node.map_or(String::new(), |n| format!("status: {{nodeName: {n}}}\n"));
        serde_yaml::from_str(&format!(
            "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}, namespace: d}}\nspec: {{cpus: {cpus}}}\n{status}"
        ))
        .unwrap()
    }

    fn loads(l: &Loads, who: &VirtualMachine) -> Vec<(String, u32)> {
        l.except(who).into_iter().collect()
    }

    #[test]
    fn placements_count_until_the_watch_shows_them_then_the_watch_counts() {
        let mut l = Loads::default();
        let (a, b, c) = (vm("a", 2, None), vm("b", 3, None), vm("c", 1, None));
        for v in [&a, &b, &c] {
            l.observe(&Event::Apply(v.clone()));
        }
        l.place(&a, "n1");
        l.place(&b, "n1");
        assert_eq!(loads(&l, &c), vec![("n1".into(), 5)]);
        // The watch shows a's status: counted once, from the watch.
        l.observe(&Event::Apply(vm("a", 2, Some("n1"))));
        assert!(!l.placed.contains_key(&ObjectRef::from_obj(&a)));
        assert_eq!(loads(&l, &c), vec![("n1".into(), 5)]);
        // a is resized to 4 and b leaves: the sums follow.
        l.observe(&Event::Apply(vm("a", 4, Some("n1"))));
        l.observe(&Event::Delete(vm("b", 3, None)));
        assert_eq!(loads(&l, &c), vec![("n1".into(), 4)]);
        // A VM's own load is left out of its view.
        assert_eq!(loads(&l, &a), vec![("n1".into(), 0)]);
    }

    #[test]
    fn a_move_counts_on_the_new_node_at_once_and_a_relist_rebuilds_the_sums() {
        let mut l = Loads::default();
        let (a, other) = (vm("a", 2, Some("old")), vm("x", 1, None));
        l.observe(&Event::Apply(a.clone()));
        l.place(&a, "new");
        assert_eq!(loads(&l, &other), vec![("new".into(), 2)]);
        // The watch restarts: a moved for real, y appeared, z is gone.
        l.observe(&Event::Init);
        l.observe(&Event::InitApply(vm("a", 2, Some("new"))));
        l.observe(&Event::InitApply(vm("y", 3, Some("old"))));
        l.observe(&Event::InitDone);
        assert_eq!(
            loads(&l, &other),
            vec![("new".into(), 2), ("old".into(), 3)]
        );
        // A placement of a VM that then vanished is dropped with it.
        let z = vm("z", 5, None);
        l.observe(&Event::Apply(z.clone()));
        l.place(&z, "old");
        l.observe(&Event::Delete(z));
        assert_eq!(
            loads(&l, &other),
            vec![("new".into(), 2), ("old".into(), 3)]
        );
    }
}
