//! A kernel-choice switch: on by default, `VAR=0` in the environment turns
//! it off, and a setter (the benches' `--old-path` flags) overrides both.
//! The environment is read once, at the first query.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

pub struct EnvSwitch {
    var: &'static str,
    /// 0: not decided yet (read `var`), 1: on, 2: off.
    state: AtomicU8,
}

impl EnvSwitch {
    pub const fn new(var: &'static str) -> Self {
        EnvSwitch {
            var,
            state: AtomicU8::new(0),
        }
    }

    pub fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Relaxed);
    }

    pub fn get(&self) -> bool {
        match self.state.load(Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let on = std::env::var(self.var).map_or(true, |v| v != "0");
                self.set(on);
                on
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EnvSwitch;

    #[test]
    fn env_default_then_setter_overrides() {
        static OFF: EnvSwitch = EnvSwitch::new("INFINITEHIP_TEST_SWITCH_OFF");
        static ON: EnvSwitch = EnvSwitch::new("INFINITEHIP_TEST_SWITCH_UNSET");
        std::env::set_var("INFINITEHIP_TEST_SWITCH_OFF", "0");
        assert!(!OFF.get());
        assert!(ON.get());
        OFF.set(true);
        ON.set(false);
        assert!(OFF.get());
        assert!(!ON.get());
    }
}
