"""Language decoder details: control strings, the control sampler, cem_memory, exact GELU, tokenizer."""
import math
import random

import pytest
import torch
from transformers.activations import GELUActivation
from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

from dynrefer_core.config import DynReferConfig
from dynrefer_core.modeling.language import LanguageDecoder, caption_phrases, control_string, sample_control
from dynrefer_core.modeling.tokenization import build_word_tokenizer, clean_decoded, load_tokenizer



@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(["a man in a white shirt", "red car"], vocab_size=200)


def test_control_string():
    assert control_string(["man", "white shirt", "man", " ", "car"]) == "man,white shirt,car|"
    assert control_string([]) == "|"


def test_caption_phrases_follow_the_noun_run_rule():
    assert caption_phrases("A man in a white shirt.") == ["man", "white shirt", "shirt"]
    assert caption_phrases("the of and") == []


def test_sample_control_probabilities():
    rng = random.Random(0)
    assert sample_control(["dog"], "a brown dog", rng, full_drop_ratio=1.0) == "|"
    kept = sample_control(["dog"], "a brown dog", rng, full_drop_ratio=0.0, drop_ratio=0.0)
    assert kept.endswith("|") and set(kept[:-1].split(",")) == {"dog", "brown dog"}
    # Keep-rate 0.5 per candidate, empty half the time: over many draws about 0.25 of the controls hold "dog".
    rng = random.Random(1)
    draws = [sample_control(["dog"], "", rng) for _ in range(2000)]
    assert 0.2 < sum(d == "dog|" for d in draws) / 2000 < 0.3
    assert 0.7 < sum(d == "|" for d in draws) / 2000 < 0.8


def test_tokenizer_ids_and_round_trip(tokenizer, tmp_path):
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    ids = tokenizer("Man,white shirt|").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["man", ",", "white", "shirt", "|", "</s>"]
    assert tokenizer("zebra").input_ids == [2, 1]
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again("man,white shirt|").input_ids == ids
    assert clean_decoded(tokenizer.decode(ids, skip_special_tokens=True)) == "man, white shirt|"


def test_exact_gelu_and_untied_lm_head():
    lm = LanguageDecoder(DynReferConfig.tiny())
    acts = [m.act for m in lm.t5.modules() if isinstance(m, T5DenseGatedActDense)]
    assert acts and all(isinstance(a, GELUActivation) for a in acts)
    x = torch.tensor([1.0])
    assert acts[0](x).item() == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))), abs=1e-7)
    assert lm.t5.lm_head.weight.data_ptr() != lm.t5.shared.weight.data_ptr()  # FlanT5 has its own lm_head
    assert lm.t5.encoder.embed_tokens.weight.data_ptr() == lm.t5.shared.weight.data_ptr()


def test_cem_memory_is_added_to_every_control_token(tokenizer):
    torch.manual_seed(0)
    lm = LanguageDecoder(DynReferConfig.tiny())
    with torch.no_grad():
        lm.control_memory.fill_(1.0)
    z = torch.randn(2, 8, 32)
    inputs, mask = lm.encoder_inputs(z, ["man|", "man,white shirt|"], tokenizer)
    ids = tokenizer(["man|", "man,white shirt|"], padding="longest", return_tensors="pt").input_ids
    assert inputs.shape == (2, 8 + ids.shape[1], 32)
    assert torch.allclose(inputs[:, :8], lm.proj(z))
    assert torch.allclose(inputs[:, 8:], lm.t5.shared(ids) + 1.0)  # padding and </s> included
    assert mask[0].tolist() == [1] * 8 + [1, 1, 1] + [0] * (ids.shape[1] - 3)


def test_generation_scores_are_probabilities(tokenizer):
    torch.manual_seed(0)
    lm = LanguageDecoder(DynReferConfig.tiny()).eval()
    texts, scores = lm.generate(torch.randn(3, 8, 32), ["|", "man|", "car|"], tokenizer)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert ((scores > 0) & (scores <= 1)).all()
    texts1, scores1 = lm.generate(torch.randn(2, 8, 32), ["|", "man|"], tokenizer, num_beams=1)
    assert ((scores1 > 0) & (scores1 <= 1)).all()


def sequence_probability(lm, inputs, mask, sequences, repetition_penalty=1.0) -> torch.Tensor:
    """P(caption | region, control) by teacher forcing: the product over the generated tokens (up to and with
    </s>) of T5's softmax, where tokens already in the sequence have their log-probability multiplied by the
    repetition penalty (how beam search applies it). With length_penalty 0 the beam's score is the log of this."""
    with torch.no_grad():
        logits = lm.t5(inputs_embeds=inputs, attention_mask=mask, decoder_input_ids=sequences[:, :-1]).logits
    log_probs = logits.double().log_softmax(-1)
    out = []
    for b, seq in enumerate(sequences.tolist()):
        total = 0.0
        for t in range(1, len(seq)):
            step = log_probs[b, t - 1].clone()
            seen = torch.tensor(sorted(set(seq[:t])))
            step[seen] = torch.where(step[seen] < 0, step[seen] * repetition_penalty, step[seen] / repetition_penalty)
            total += step[seq[t]].item()
            if seq[t] == 1:  # </s>
                break
        out.append(math.exp(total))
    return torch.tensor(out, dtype=torch.float64)


def test_caption_score_is_the_sequence_probability(tiny_model):
    """The caption score is exp(sequences_scores) of the beam (spec 4.3): with length_penalty 0, the caption's
    probability under the decoder. Checked against teacher forcing, and against transformers' own beam score."""
    lm, tokenizer, s = tiny_model.language, tiny_model.tokenizer, tiny_model.config.language
    assert s.length_penalty == 0.0 and s.num_beams == 2 and s.repetition_penalty == 1.5
    z = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(0))
    controls = ["|", "man|", "car,red|", "dog|"]
    _, scores = lm.generate(z, controls, tokenizer)
    inputs, mask = lm.encoder_inputs(z, controls, tokenizer)
    with torch.no_grad():
        beam = lm.t5.generate(inputs_embeds=inputs, attention_mask=mask, num_beams=s.num_beams, do_sample=False,
                              max_new_tokens=s.max_new_tokens, min_length=s.min_length, length_penalty=0.0,
                              repetition_penalty=s.repetition_penalty, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    expected = sequence_probability(lm, inputs, mask, beam.sequences, s.repetition_penalty)
    torch.testing.assert_close(beam.sequences_scores.double().exp(), expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=0)
    assert expected.max() > 0.6  # far from sigmoid(log p) = p / (1 + p) <= 0.5: the check can tell them apart
    # Without the repetition penalty the score is the plain probability; greedy search sums the same way.
    plain = {}
    for beams in (2, 1):
        _, plain[beams] = lm.generate(z, controls, tokenizer, repetition_penalty=1.0, num_beams=beams)
        with torch.no_grad():
            seqs = lm.t5.generate(inputs_embeds=inputs, attention_mask=mask, num_beams=beams, do_sample=False,
                                  max_new_tokens=s.max_new_tokens, length_penalty=0.0, pad_token_id=0,
                                  eos_token_id=1, decoder_start_token_id=0)
        torch.testing.assert_close(plain[beams].double(), sequence_probability(lm, inputs, mask, seqs),
                                   rtol=1e-4, atol=0, msg=f"num_beams={beams}")
