"""Context parallelism for whole models, independent of the model family (docs/DESIGN.md):

    mesh.py        the ("dp", "cp") device mesh and a model's process groups
    model.py       `CPModelMixin` (groups, the split and sharding of a call's inputs, the forward's
                   cross-rank check) and `CPForCausalLMMixin` (causal-LM forward, generate)
    loss.py        labels shifted on the global sequence, the global token-mean loss
    gradients.py   `sync_gradients`
    fsdp.py        `apply_fsdp2` (FSDP2 over the flattened dp x cp mesh, the reduction `sync_gradients` does)
A model family's modeling file is plain modeling code that mixes these in (see
`fla_cp/models/gated_deltanet_cp/modeling_gated_deltanet_cp.py`); the cross-rank checks live in
`fla_cp/checks.py`.
"""
from fla_cp.parallel.fsdp import apply_fsdp2
from fla_cp.parallel.gradients import sync_gradients
from fla_cp.parallel.loss import shift_labels_globally
from fla_cp.parallel.mesh import init_cp_mesh
from fla_cp.parallel.model import CPForCausalLMMixin, CPModelMixin

__all__ = ["CPForCausalLMMixin", "CPModelMixin", "apply_fsdp2", "init_cp_mesh", "shift_labels_globally",
           "sync_gradients"]
