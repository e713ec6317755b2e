"""jaxmerge.evaluate: response log-likelihood and exact-match accuracy of greedy answers.

References: the transformers twin of a tiny random model (PyTorch, float32) scoring each
unpadded example alone, and its own greedy ``generate``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxmerge import evaluate, models
from jaxmerge.errors import ConfigError
from jaxmerge.fisher import data
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

EXAMPLES = [
    data.Example(prompt="what is two plus three ?", response="five"),
    data.Example(prompt="red", response="blue green yes"),
    data.Example(prompt="the dog is", response=""),
    data.Example(prompt="a cat sat on a mat . what is it ?", response="the cat"),
    data.Example(prompt="is the cat blue ?", response="no"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory, torch_model = make_tiny_model("llama", tmp_path_factory.mktemp("evaluate"),
                                             seed=7)
    tokenizer = make_tiny_tokenizer(directory)
    return {"model": models.load_model(directory), "torch": torch_model.eval(),
            "tokenizer": tokenizer}


def torch_log_likelihood(torch_model, example: data.Tokenized) -> float:
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(torch_model(ids).logits[0].double(), dim=-1)
    return float(sum(log_probs[t - 1, example.input_ids[t]]
                     for t in range(example.first_target, len(example.input_ids))))


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_log_likelihood_equals_torch_per_example(tiny, batch_size):
    got = evaluate.log_likelihood(tiny["model"], tiny["tokenizer"], EXAMPLES,
                                  batch_size=batch_size)
    tokenized = data.tokenize(EXAMPLES, tiny["tokenizer"])
    expected = np.array([torch_log_likelihood(tiny["torch"], t) for t in tokenized])
    np.testing.assert_allclose(got.per_example, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got.num_tokens, [t.num_targets for t in tokenized])
    assert got.num_tokens[2] == 1  # an empty response still scores its EOS
    assert got.mean == pytest.approx(expected.mean(), abs=1e-4)
    assert got.per_token == pytest.approx(expected.sum() / got.num_tokens.sum(), abs=1e-4)


def test_log_likelihood_with_apply_fn_and_other_params(tiny):
    apply_fn, params = models.functional(tiny["model"])
    own = evaluate.log_likelihood(apply_fn, tiny["tokenizer"], EXAMPLES, params=params)
    doubled = evaluate.log_likelihood(apply_fn, tiny["tokenizer"], EXAMPLES,
                                      params=jax_scale(params, 2.0))
    assert not np.allclose(own.per_example, doubled.per_example)
    with pytest.raises(ConfigError, match="apply_fn and its params"):
        evaluate.log_likelihood(apply_fn, tiny["tokenizer"], EXAMPLES)


def jax_scale(params, factor):
    import jax

    return jax.tree.map(lambda p: p * factor, params)


def torch_greedy_answer(tiny, prompt: str, max_new_tokens: int) -> str:
    tokenizer = tiny["tokenizer"]
    ids = torch.tensor([data.prompt_ids(tokenizer, prompt)])
    with torch.no_grad():
        out = tiny["torch"].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, eos_token_id=2,
                                     pad_token_id=0)
    answer = [int(t) for t in out[0, ids.shape[1]:]]
    if 2 in answer:
        answer = answer[:answer.index(2)]
    return tokenizer.decode(answer, skip_special_tokens=True)


def test_exact_match_scores_greedy_answers(tiny):
    """References: the transformers greedy answer for even examples, a wrong one for odd."""
    answers = [torch_greedy_answer(tiny, e.prompt, 6) for e in EXAMPLES]
    examples = [data.Example(prompt=e.prompt, response=(a if i % 2 == 0 else a + " mat"))
                for i, (e, a) in enumerate(zip(EXAMPLES, answers, strict=True))]
    result = evaluate.exact_match(tiny["model"], tiny["tokenizer"], examples, max_new_tokens=6,
                                  batch_size=2)  # 5 prompts: the last batch is filled
    assert result.predictions == answers
    assert result.correct == [True, False, True, False, True]
    assert result.accuracy == pytest.approx(0.6)
    assert result.references == [e.response for e in examples]
    padded = [data.Example(prompt=e.prompt, response="  " + e.response + "\n")
              for e in examples]  # only outer whitespace is normalised away
    again = evaluate.exact_match(tiny["model"], tiny["tokenizer"], padded, max_new_tokens=6,
                                 batch_size=4)
    assert again.correct == result.correct


def test_exact_match_rejects_text_examples(tiny, tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text('{"text": "the cat sat"}\n')
    with pytest.raises(ConfigError, match="prompt"):
        evaluate.exact_match(tiny["model"], tiny["tokenizer"], path)
    with pytest.raises(ConfigError, match="no examples"):
        evaluate.log_likelihood(tiny["model"], tiny["tokenizer"], [])
