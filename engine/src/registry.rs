//! Stage kinds by name.

use crate::stage::Stage;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The set of stage kinds a pipeline may use.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn Stage>>,
    /// Former names of renamed kinds: old name -> current name.
    aliases: BTreeMap<&'static str, &'static str>,
}

impl Registry {
    /// A registry holding the engine's built-in kinds (`shell`).
    pub fn with_builtins() -> Self {
        let mut r = Registry::default();
        r.register(Arc::new(crate::shell::ShellStage));
        r
    }

    /// Adds a kind; a later registration of the same name replaces the earlier one.
    pub fn register(&mut self, stage: Arc<dyn Stage>) {
        self.kinds.insert(stage.kind(), stage);
    }

    /// Keeps `old`, the former name of the kind now called `current`, working: pipelines
    /// that use it plan as before, with a warning that names the new name.
    pub fn register_alias(&mut self, old: &'static str, current: &'static str) {
        self.aliases.insert(old, current);
    }

    /// The kind called `name` (not following former names; see [`Registry::resolve`]).
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Stage>> {
        self.kinds.get(name)
    }

    /// The kind called `name`, or the kind it was renamed to with that new name.
    pub fn resolve(&self, name: &str) -> Option<(&Arc<dyn Stage>, Option<&'static str>)> {
        match self.kinds.get(name) {
            Some(k) => Some((k, None)),
            None => {
                let current = self.aliases.get(name)?;
                Some((self.kinds.get(current)?, Some(*current)))
            }
        }
    }

    /// Former names, `(old, current)`, sorted by the old name.
    pub fn aliases(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.aliases.iter().map(|(o, c)| (*o, *c))
    }

    /// All kinds, sorted by name.
    pub fn kinds(&self) -> impl Iterator<Item = &Arc<dyn Stage>> {
        self.kinds.values()
    }

    /// Registered names closest to `name` (for "did you mean").
    pub fn suggest(&self, name: &str) -> Vec<&'static str> {
        let mut scored: Vec<(usize, &'static str)> = self
            .kinds
            .keys()
            .map(|k| (crate::util::edit_distance(name, k), *k))
            .filter(|(d, k)| *d <= 3.max(k.len() / 3) || k.contains(name) || name.contains(k))
            .collect();
        scored.sort();
        scored.into_iter().take(3).map(|(_, k)| k).collect()
    }
}
