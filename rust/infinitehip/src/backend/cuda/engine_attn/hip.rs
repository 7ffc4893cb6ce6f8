//! hip layers of `GpuAttention`: the per-slot mask-refresh state.

use super::super::dispatch::StageBuf;
use super::super::rope_gpu::RopeGpu;
use super::super::DevBuf;
use crate::config::HipConfig;
use crate::error::Result;

/// Slots per allocation of hip state.
pub(super) const CHUNK: usize = 16;

pub(super) struct HipLayer {
    pub cfg: HipConfig,
    /// Per chunk of CHUNK slots, per stage: (out, cnt).
    pub chunks: Vec<Vec<(DevBuf, DevBuf)>>,
    pub caps: Vec<usize>,
    /// Per slot: decode steps since the last reset, and the middle's end at
    /// the last full refresh.
    pub step: Vec<usize>,
    pub mid_end: Vec<usize>,
    /// RoPE modes of this layer (None: original positions), see `rope`.
    pub rope: Option<Box<RopeGpu>>,
}

impl HipLayer {
    pub fn stage_view(&self, slot: usize, s: usize, hkv: usize) -> StageBuf {
        let (out, cnt) = &self.chunks[slot / CHUNK][s];
        let r = (slot % CHUNK) * hkv;
        StageBuf {
            out: DevBuf::borrowed(out.ptr + (r * self.caps[s] * 8) as u64, 0),
            cnt: DevBuf::borrowed(cnt.ptr + (r * 4) as u64, 0),
            cap: self.caps[s],
        }
    }
    pub fn ensure_slots(&mut self, n: usize, hkv: usize) -> Result<()> {
        while self.chunks.len() * CHUNK < n {
            let mut st = Vec::new();
            for &cap in &self.caps {
                st.push((
                    DevBuf::alloc(CHUNK * hkv * cap * 8)?,
                    DevBuf::alloc(CHUNK * hkv * 4)?,
                ));
            }
            self.chunks.push(st);
        }
        if self.step.len() < n {
            self.step.resize(n, 0);
            self.mid_end.resize(n, 0);
        }
        Ok(())
    }
    /// Entries of a row's sparse v2 position table: the sink and the last
    /// stage's chunks (as `HipGpuDecoder`'s).
    pub fn tab_cap(&self) -> usize {
        self.cfg.sink + self.caps.last().unwrap() * self.cfg.stages.last().unwrap().chunk_size
    }
    #[allow(clippy::manual_is_multiple_of)] // MSRV 1.80
    pub fn refresh_from(&self, slot: usize) -> usize {
        let step = self.step[slot];
        if step == 0 {
            return 0;
        }
        (0..self.cfg.stages.len())
            .find(|&i| step % self.cfg.stages[i].refresh_interval == 0)
            .unwrap_or(self.cfg.stages.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_schedule_per_slot() {
        let cfg = HipConfig::default();
        let mut h = HipLayer {
            caps: vec![1; cfg.stages.len()],
            cfg: cfg.clone(),
            chunks: Vec::new(),
            step: vec![0, 5],
            mid_end: vec![0, 0],
            rope: None,
        };
        assert_eq!(h.refresh_from(0), 0);
        // Default intervals 16 / 8 / 4: step 5 refreshes nothing, 8 from
        // stage 1, 16 everything.
        assert_eq!(h.refresh_from(1), cfg.stages.len());
        h.step[1] = 8;
        assert_eq!(h.refresh_from(1), 1);
        h.step[1] = 32;
        assert_eq!(h.refresh_from(1), 0);
    }
}
