//! A kernel-choice switch: on by default, `VAR=0` in the environment turns
//! it off (`new_off`: off by default, `VAR=1` turns it on), and a setter
//! (the benches' `--old-path` flags) overrides both. The environment is
//! read once, at the first query.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

pub struct EnvSwitch {
    var: &'static str,
    default_on: bool,
    /// 0: not decided yet (read `var`), 1: on, 2: off.
    state: AtomicU8,
}

impl EnvSwitch {
    pub const fn new(var: &'static str) -> Self {
        EnvSwitch {
            var,
            default_on: true,
            state: AtomicU8::new(0),
        }
    }

    /// Off unless `VAR=1` (or the setter): paths not yet measured on a GPU.
    pub const fn new_off(var: &'static str) -> Self {
        EnvSwitch {
            var,
            default_on: false,
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
                let on = match std::env::var(self.var) {
                    Ok(v) if self.default_on => v != "0",
                    Ok(v) => v == "1",
                    Err(_) => self.default_on,
                };
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

    #[test]
    fn off_by_default_until_asked() {
        static UNSET: EnvSwitch = EnvSwitch::new_off("INFINITEHIP_TEST_SWITCH_NEW_OFF_UNSET");
        static ASKED: EnvSwitch = EnvSwitch::new_off("INFINITEHIP_TEST_SWITCH_NEW_OFF_ONE");
        std::env::set_var("INFINITEHIP_TEST_SWITCH_NEW_OFF_ONE", "1");
        assert!(!UNSET.get());
        assert!(ASKED.get());
        UNSET.set(true);
        assert!(UNSET.get());
    }
}
