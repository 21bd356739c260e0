"""examples/profile_cpu_step.py: executed HLO ops go to the part their name stack and dot shapes say."""

from __future__ import annotations

import pytest

from example_scripts import load_example

# A hand-written excerpt in the compiled HLO's format: two fused dots (base 768->2304, LoRA 768->16), the
# chunked head's dot, an attention softmax, a layer norm, the AdamW update.
HLO = """HloModule jit_step

%fused_base (p0: f32[512,768], p1: f32[768,2304]) -> f32[512,2304] {
  ROOT %dot.1 = f32[512,2304]{1,0} dot(f32[512,768]{1,0} %p0, f32[768,2304]{1,0} %p1)
}

%fused_lora (p0: f32[512,768], p1: f32[768,16]) -> f32[512,16] {
  ROOT %dot.2 = f32[512,16]{1,0} dot(f32[512,768]{1,0} %p0, f32[768,16]{1,0} %p1)
}

ENTRY %main (a: f32[512,768]) -> f32[] {
  %ynn_fusion.1 = f32[512,2304]{1,0} fusion(%a, %k), kind=kCustom, calls=%fused_base, metadata={op_name="jit(step)/jvp(GPT2.hidden)/transformer/h/0/attn/c_attn/dot_general"}
  %ynn_fusion.2 = f32[512,16]{1,0} fusion(%a, %A), kind=kCustom, calls=%fused_lora, metadata={op_name="jit(step)/jvp(GPT2.hidden)/transformer/h/0/attn/c_attn/dot_general"}
  %ynn_fusion.3 = f32[128,50257]{1,0} fusion(%h, %e), kind=kCustom, calls=%fused_base, metadata={op_name="jit(step)/jvp()/while/body/closed_call/cd,vd->cv/dot_general"}
  %exp_fusion = f32[4,12,128,128]{3,2,1,0} fusion(%s), kind=kLoop, metadata={op_name="jit(step)/transpose(jvp(GPT2.hidden))/transformer/h/0/attn/exp"}
  %rsqrt_fusion = f32[512]{0} fusion(%x), kind=kLoop, metadata={op_name="jit(step)/jvp(GPT2.hidden)/transformer/h/3/ln_2/rsqrt"}
  %adam_fusion = f32[768,16]{1,0} fusion(%g), kind=kLoop, metadata={op_name="jit(step)/add"}
  ROOT %r = f32[] constant(0)
}
"""


@pytest.mark.parametrize("instruction, part", [
    ("ynn_fusion.1", "block_matmuls"), ("ynn_fusion.2", "lora"), ("ynn_fusion.3", "lm_head_ce"),
    ("exp_fusion", "attention"), ("rsqrt_fusion", "ln_gelu"), ("adam_fusion", "optimizer"),
])
def test_ops_go_to_their_part(instruction, part):
    module = load_example("profile_cpu_step")
    names, bodies = module.parse_hlo(HLO)
    assert names["ynn_fusion.2::calls"] == "fused_lora"
    assert module.part_of(instruction, names, bodies, rank=16) == part
