"""Gin registration of the routed units of informed routing and its greedy baseline.

`layers.routing.RoutedFFN` plugs into `DecoderConfig.ffn_cls` and `RoutedAttention` into
`DecoderConfig.attention_cls`; which units are routed is which of the two slots a config sets
(configs/informed_routing.gin routes the FFNs; add the attention line to route both). As for
Duo (adacomp/methods/duo/factories.py), gin configures factories returning the classes with
their routing attributes bound, because flax linen classes cannot be gin-configurable themselves:

    DecoderConfig.ffn_cls = @routed_ffn()
    routed_ffn.sparsity = %SPARSITY
    routed_ffn.mode = 'informed'          # or 'greedy' (Mixture-of-Depths)
    DecoderConfig.attention_cls = @routed_attention()   # optional: route attention too
    routed_attention.sparsity = %SPARSITY
    routed_ffn.lora_rank = 8              # the LoRA stage: adapters on the frozen FFN matrices
    routed_ffn.decision = 'causal'        # inference: per-token causal decisions (eval.py's
                                          # default, scripts/generate.py always)
"""
import functools
from typing import Optional

import gin

from layers.routing import RoutedAttention, RoutedFFN


def _routing_kwargs(sparsity, mode, compute, forecaster_rank, router_hidden, distill_weight,
                    recoverability_weight, decision, causal_weight, impl):
  return dict(sparsity=float(sparsity), mode=mode, compute=compute,
              forecaster_rank=forecaster_rank, router_hidden=router_hidden,
              distill_weight=float(distill_weight),
              recoverability_weight=float(recoverability_weight), decision=decision,
              causal_weight=float(causal_weight), impl=impl)


@gin.configurable
def routed_ffn(*, sparsity: float = RoutedFFN.sparsity, mode: str = RoutedFFN.mode,
               compute: str = RoutedFFN.compute,
               forecaster_rank: Optional[int] = RoutedFFN.forecaster_rank,
               router_hidden: Optional[int] = RoutedFFN.router_hidden,
               distill_weight: float = RoutedFFN.distill_weight,
               recoverability_weight: float = RoutedFFN.recoverability_weight,
               decision: str = RoutedFFN.decision,
               causal_weight: float = RoutedFFN.causal_weight,
               lora_rank: Optional[int] = RoutedFFN.lora_rank,
               impl: Optional[str] = RoutedFFN.impl):
  """`RoutedFFN` with these attributes bound (see layers/routing.py; the defaults are its own);
  the block supplies d_ff, activation and the dtypes. `lora_rank` adds LoRA adapters to every
  FFN matrix (the LoRA stage, configs/informed_routing_lora.gin)."""
  return functools.partial(RoutedFFN, lora_rank=lora_rank, **_routing_kwargs(
      sparsity, mode, compute, forecaster_rank, router_hidden, distill_weight,
      recoverability_weight, decision, causal_weight, impl))


@gin.configurable
def routed_attention(*, sparsity: float = RoutedAttention.sparsity,
                     mode: str = RoutedAttention.mode, compute: str = RoutedAttention.compute,
                     forecaster_rank: Optional[int] = RoutedAttention.forecaster_rank,
                     router_hidden: Optional[int] = RoutedAttention.router_hidden,
                     distill_weight: float = RoutedAttention.distill_weight,
                     recoverability_weight: float = RoutedAttention.recoverability_weight,
                     decision: str = RoutedAttention.decision,
                     causal_weight: float = RoutedAttention.causal_weight,
                     impl: Optional[str] = RoutedAttention.impl):
  """`RoutedAttention` with these attributes bound; the block supplies the head layout, the
  rotary settings and the dtypes."""
  return functools.partial(RoutedAttention, **_routing_kwargs(
      sparsity, mode, compute, forecaster_rank, router_hidden, distill_weight,
      recoverability_weight, decision, causal_weight, impl))


def decision_bindings(decision: str) -> list:
  """Gin bindings choosing the routed units' decision: 'causal' (what a generating model does;
  eval.py's default, scripts/generate.py always) or 'topk' (the teacher-forced per-sequence
  top-k the units trained with). Harmless for models without routed units."""
  if decision not in ("causal", "topk"):
    raise ValueError(f"Routing decision {decision!r}: choose 'causal' (the number a "
                     f"generating model reaches) or 'topk' (teacher-forced, not causal).")
  return [f"routed_ffn.decision = {decision!r}", f"routed_attention.decision = {decision!r}"]

