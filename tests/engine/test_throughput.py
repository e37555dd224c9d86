"""`glmkit bench --concurrency` and `--long-prompt` on a tiny random model: what they count must be what ran."""

import json
import subprocess
import sys

from glmkit.engine import throughput
from glmkit.families import transformers_glm

from layouts import hf_config
from tiny import random_model


def model():
    return random_model(transformers_glm.GLM4.config(hf_config("glm4", vocab_size=256)), seed=1).float().eval()


def test_concurrency_counts_every_stream_and_the_blocks_they_held():
    result = throughput.concurrency(model(), streams=3, prompt_len=20, new_tokens=13)
    # 20 + 12 fed tokens each: 2 blocks of 16 a stream at the peak, all three running together
    assert result["peak_kv_blocks"] == 6 and result["kv_block_tokens"] == 16
    assert result["aggregate_decode_tokens_per_s"] > 0
    assert 0 < result["inter_token_ms_p50"] <= result["inter_token_ms_p95"]


def test_a_long_prompt_in_chunks_reaches_its_first_token_after_the_streams_kept_going():
    result = throughput.long_prompt(model(), streams=2, long_len=120, new_tokens=30, step_tokens=18)
    assert result["step_tokens"] == 18 and result["long_prompt_len"] == 120
    # encoded 16 tokens a step beside the 2 streams: the streams' tokens kept coming meanwhile
    assert result["streams_inter_token_ms_during_median"] is not None
    assert result["long_prompt_time_to_first_token_s"] > 0


def test_the_cli_prints_the_engine_run_as_json_with_the_bound_beside_it():
    out = subprocess.run([sys.executable, "-m", "glmkit", "bench", "--shape", "tiny-gqa", "--concurrency", "1", "2",
                          "--prompt-len", "8", "--new-tokens", "4", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    [result] = json.loads(out)["results"]
    assert [c["streams"] for c in result["concurrency"]] == [1, 2]
    assert result["batch1_bound_tokens_per_s"] > 0 and result["read_bandwidth_gb_per_s"] > 0
    assert result["peak_rss_gib"] > 0
