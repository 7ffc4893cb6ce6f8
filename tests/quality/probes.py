"""Token sequences the suite scores, built from the tokenized novels.

One scoring sequence per context length L serves three metrics in one
teacher-forced run (one prefill, then single-token decode steps):

    [body with K planted passages][continuation][repeat of passage 1..K]
    |<------------- prefill (P) ------------->|<--- decode-scored ----->|

- prefill-scored perplexity: targets in the second half of the prefill
  (and the first continuation token, scored by the last prefill row),
- decode-scored perplexity: the other D - 1 continuation tokens (the text
  that naturally follows the body),
- copy probe: each passage (Lp tokens from far elsewhere in the novels) is
  planted at a depth (fraction of the body) and repeated at the end; the
  first `cue` tokens of a repeat are context, the rest are scored (token
  accuracy of the argmax, mean NLL).

Passkey (a separate sequence, since it needs one question): filler text with
"The pass key is NNNNN. Remember it. NNNNN is the pass key." at a depth,
then "What is the pass key? The pass key is" and the digits scored.
"""
from dataclasses import dataclass, field


@dataclass
class Sequence:
    ids: list
    prefill: int  # tokens through prefill ubatches
    prefill_scored: range  # target positions scored as prefill perplexity
    decode_scored: range  # target positions scored as decode perplexity
    probes: list = field(default_factory=list)  # [{"depth", "start", "scored": range}]

    def __len__(self):
        return len(self.ids)


def copy_sequence(corpus, length, n_decode, depths, passage_len, cue, body_start, passage_start, bos=None):
    """The scoring sequence of `length` tokens (see the module doc).

    corpus: token ids of the novels; bos: the BOS id to put first (None when
    the tokenizer adds none, as SmolLM2's). body_start / passage_start: corpus offsets of the body text and
    of the passages (passages are consecutive, passage_len apart, and must
    not overlap the body window)."""
    k = len(depths)
    body_len = length - n_decode - k * passage_len
    if body_len < k * passage_len + 64 or cue >= passage_len or n_decode < 1:
        raise ValueError(f"length {length} too short for {k} passages of {passage_len} + {n_decode} decode tokens")
    if any(not 0.0 < d < 1.0 for d in depths) or list(depths) != sorted(depths):
        raise ValueError(f"depths must be increasing in (0, 1): {depths}")
    text_len = body_len - k * passage_len  # body tokens that are not planted passages
    body_end = body_start + text_len + n_decode
    pas_end = passage_start + k * passage_len
    if not (pas_end <= body_start or passage_start >= body_end) or max(body_end, pas_end) > len(corpus):
        raise ValueError("passages overlap the body window or run past the corpus")
    bos = [] if bos is None else [bos]
    text = list(corpus[body_start:body_start + text_len - len(bos)])
    passages = [list(corpus[passage_start + i * passage_len:passage_start + (i + 1) * passage_len]) for i in range(k)]
    ids, starts, prev = bos[:], [], 0
    for d, p in zip(depths, passages):
        cut = int(round(d * len(text)))
        ids += text[prev:cut]
        starts.append(len(ids))
        ids += p
        prev = cut
    ids += text[prev:]
    prefill = len(ids)
    ids += list(corpus[body_start + text_len - len(bos):body_start + text_len - len(bos) + n_decode])
    probes = []
    for d, s, p in zip(depths, starts, passages):
        r0 = len(ids)
        ids += p
        probes.append({"depth": d, "planted_at": s, "scored": range(r0 + cue, r0 + passage_len)})
    assert len(ids) == length, (len(ids), length)
    # target t is scored by the logits after token t-1: target `prefill` by
    # the last prefill row, the targets after it by single-token decodes
    return Sequence(ids=ids, prefill=prefill, prefill_scored=range(prefill // 2, prefill + 1),
                    decode_scored=range(prefill + 1, prefill + n_decode), probes=probes)


PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_texts(filler, depth, key):
    """(prompt text, prompt + answer text): filler with the needle inserted at
    a paragraph boundary near `depth` (fraction of the filler's characters)."""
    cut = int(depth * len(filler))
    nl = filler.rfind("\n\n", 0, cut)
    cut = nl if nl > 0 else cut
    prompt = filler[:cut] + PASSKEY_NEEDLE.format(key=key) + filler[cut:] + PASSKEY_QUESTION
    return prompt, prompt + f" {key}."


def answer_span(prompt_ids, full_ids):
    """Positions of the answer tokens in full_ids (the tokens after the
    longest common prefix with prompt_ids; tokenizers may merge across the
    boundary, so the prefix is compared token by token)."""
    n = 0
    while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
        n += 1
    if n == len(full_ids):
        raise ValueError("answer adds no tokens")
    return range(n, len(full_ids))
