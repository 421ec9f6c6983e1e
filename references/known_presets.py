"""The conventions found in the wild, each with its provenance: the preset table.

See :mod:`references.presets` for how to use them; each entry says where it comes from (project,
file or specification section, version) and what the original computes that the exact reference
does not model.
"""

from __future__ import annotations

from typing import Final

from references.preset_model import Preset, float32_value

_F32_EPS: Final = float32_value(1e-5)  # 9.999999747378752e-06: ONNX's epsilon default as stored
_F32_MOMENTUM: Final = float32_value(0.9)  # 0.8999999761581421: ONNX BatchNormalization's momentum

_ONNX_EPS_NOTE: Final = (
    " eps is float32(1e-5) = 9.999999747378752e-06, not the binary64 1e-5: the attribute is a "
    "32-bit float in the model (AttributeProto FLOAT) and the function bodies in "
    "onnx/defs/nn/defs.cc materialise it as a float tensor (Const FloatEpsilon) before casting "
    "it to the computation type, so no conforming runtime adds any other value, whatever the "
    "input dtype (float64 included)."
)

KNOWN_PRESETS: Final[tuple[Preset, ...]] = (
    # --- PyTorch ---------------------------------------------------------------------------
    Preset(
        name="pytorch.layer_norm",
        op="layer_norm",
        kwargs={"eps": 1e-5, "variance": "biased", "eps_placement": "inside", "weight_offset": 0.0},
        provenance=(
            "PyTorch 2.x torch.nn.functional.layer_norm / torch.nn.LayerNorm: eps=1e-5 default "
            "(signature read on torch 2.13.0); (x - E[x]) / sqrt(Var[x] + eps) * w + b with the "
            "biased variance (docs: 'via the biased estimator, equivalent to "
            "torch.var(input, unbiased=False)'; checked numerically on torch 2.13.0 CPU, "
            "float64). Not modelled: ATen accumulates in the opmath type (float32 for "
            "float16/bfloat16/float32 inputs, Welford's algorithm) and adds "
            "static_cast<T_ACC>(eps) (CUDA layer_norm kernel), so for float32 and narrower "
            "inputs the eps actually added is float32(1e-5); intermediate roundings of the kernel."
        ),
    ),
    Preset(
        name="pytorch.rms_norm",
        op="rms_norm",
        kwargs={"eps": None, "variance": "biased", "eps_placement": "inside", "weight_offset": 0.0},
        provenance=(
            "PyTorch torch.nn.functional.rms_norm(input, normalized_shape, weight=None, eps=None) "
            "/ torch.nn.RMSNorm (torch >= 2.4): x / sqrt(mean(x^2) + eps) * w. eps=None is kept on "
            "purpose: it means the machine epsilon of the opmath type, 2**-23 for "
            "float32/float16/bfloat16 inputs and 2**-52 for float64 (checked numerically on "
            "torch 2.13.0 CPU: a float16 row with mean square 2**-24 matches 2**-23, not "
            "float16's own 2**-10), and the reference applies that rule per dtype. Caution: an "
            "older ATen composite rms_norm (stored copy of aten/src/ATen/native/layer_norm.cpp, "
            "version not identified) used numeric_limits<scalar_value_type<scalar_t>>::epsilon(), "
            "the input type's own epsilon (bfloat16 2**-7, float16 2**-10), so older torch "
            "versions differ for 16-bit inputs. Not modelled: opmath accumulation and the "
            "roundings between rsqrt, the product with x and the product with weight."
        ),
    ),
    Preset(
        name="pytorch.group_norm",
        op="group_norm",
        kwargs={"eps": 1e-5, "variance": "biased", "eps_placement": "inside", "weight_offset": 0.0},
        provenance=(
            "PyTorch torch.nn.functional.group_norm(input, num_groups, weight=None, bias=None, "
            "eps=1e-5) / torch.nn.GroupNorm: statistics per (sample, group) over the group's "
            "channels and all spatial positions, biased variance, eps inside the root, "
            "per-channel affine (signature and biased estimator checked on torch 2.13.0, "
            "float64). Not modelled: opmath accumulation (float32 for 16-bit inputs) with eps "
            "converted to that type (static_cast<T_ACC>(eps) in the CUDA group-norm kernels), "
            "and the kernels' intermediate roundings."
        ),
    ),
    Preset(
        name="pytorch.batch_norm",
        op="batch_norm",
        kwargs={
            "eps": 1e-5,
            "variance": "biased",
            "eps_placement": "inside",
            "weight_offset": 0.0,
            "running_variance": "unbiased",
            "momentum": 0.1,
            "momentum_weights": "new",
        },
        provenance=(
            "PyTorch torch.nn.functional.batch_norm(..., training=False, momentum=0.1, eps=1e-5) "
            "/ torch.nn.BatchNorm{1,2,3}d. Training normalises with the batch statistics per "
            "channel over N and the spatial dims using the biased variance, but running_var "
            "receives the UNBIASED batch variance (docs: 'the value stored in the moving average "
            "of the standard-deviation is calculated via the unbiased estimator'); the update is "
            "new = (1 - momentum) * old + momentum * x_t, momentum weighting the new value; "
            "momentum=None gives a cumulative average. Checked numerically on torch 2.13.0 CPU "
            "(float64). torch 2.13 rejects eps <= 0 when training ('batch_norm eps must be "
            "positive during training'). Not modelled: backend choice (native, cuDNN, MIOpen), "
            "float32 running statistics and accumulation for 16-bit inputs, eps converted to the "
            "accumulation type, and the running-statistics update rounded step by step."
        ),
    ),
    Preset(
        name="pytorch.instance_norm",
        op="instance_norm",
        kwargs={
            "eps": 1e-5,
            "variance": "biased",
            "eps_placement": "inside",
            "weight_offset": 0.0,
            "running_variance": "unbiased",
            "momentum": 0.1,
            "momentum_weights": "new",
        },
        provenance=(
            "PyTorch torch.nn.functional.instance_norm(input, running_mean=None, "
            "running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, "
            "eps=1e-5) / torch.nn.InstanceNorm{1,2,3}d (affine=False, track_running_stats=False "
            "by default): statistics per (sample, channel) over the spatial dims, biased "
            "variance, eps inside. ATen (Normalization.cpp, instance_norm) runs batch_norm on "
            "the input viewed as (1, N*C, ...) and stores running_var_.view({b, c}).mean(0), so "
            "running_var moves towards the batch mean of the per-instance UNBIASED variances, "
            "momentum weighting the new value (checked numerically on torch 2.13.0 CPU, "
            "float64). Not modelled: batch_norm's kernel numerics and the floating-point mean "
            "over the batch of the updated statistics."
        ),
    ),
    # --- ONNX ------------------------------------------------------------------------------
    Preset(
        name="onnx.layer_norm",
        op="layer_norm",
        kwargs={
            "eps": _F32_EPS,
            "variance": "biased",
            "eps_placement": "inside",
            "weight_offset": 0.0,
        },
        provenance=(
            "ONNX LayerNormalization, since opset 17 (onnx/defs/nn/defs.cc; operator page on "
            "onnx.ai): axis=-1, epsilon=1e-5, stash_type=1 (float32); Var = ReduceMean(D*D) "
            "with D = X - Mean (population variance), Normalized = D / sqrt(Var + epsilon), "
            "Y = Normalized * Scale + B." + _ONNX_EPS_NOTE + " Not modelled: stage one runs in "
            "stash_type (float32 by default, so float64 inputs are cast down); Normalized is "
            "cast back to T before the affine step (a second rounding); the function body "
            "computes Var = ReduceMean(X*X) - Mean*Mean (cancellation-prone) although the "
            "operator doc writes ReduceMean(D*D); runtimes such as onnxruntime use own kernels."
        ),
    ),
    Preset(
        name="onnx.batch_norm",
        op="batch_norm",
        kwargs={
            "eps": _F32_EPS,
            "variance": "biased",
            "eps_placement": "inside",
            "weight_offset": 0.0,
            "running_variance": "biased",
            "momentum": _F32_MOMENTUM,
            "momentum_weights": "running",
        },
        provenance=(
            "ONNX BatchNormalization, opset 15 (onnx/defs/nn/defs.cc; onnx.ai): epsilon=1e-5 "
            "and momentum=0.9, both FLOAT attributes. training_mode=1: Y = (X - current_mean) / "
            "sqrt(current_var + epsilon) * scale + B; running_mean = input_mean * momentum + "
            "current_mean * (1 - momentum), running_var = input_var * momentum + current_var * "
            "(1 - momentum): momentum weights the RUNNING value, and current_var = ReduceVar is "
            "'the population variance ... (this formula does not use sample size N - 1)', so "
            "the running variance uses the BIASED estimator, unlike PyTorch (the ONNX reference "
            "implementation onnx/reference/ops/op_batch_normalization.py uses x.var()). "
            "training_mode=0 normalises with input_mean/input_var." + _ONNX_EPS_NOTE + " For the "
            "same reason momentum is float32(0.9) = 0.8999999761581421. Not modelled: the "
            "documented float32 computation of ReduceMean/ReduceVar for float16 inputs and the "
            "runtime kernels' roundings."
        ),
    ),
    Preset(
        name="onnx.instance_norm",
        op="instance_norm",
        kwargs={
            "eps": _F32_EPS,
            "variance": "biased",
            "eps_placement": "inside",
            "weight_offset": 0.0,
        },
        provenance=(
            "ONNX InstanceNormalization (since_version 22 on onnx.ai when read): y = scale * "
            "(x - mean) / sqrt(variance + epsilon) + B, mean and variance per instance per "
            "channel, epsilon=1e-5 FLOAT. The operator text does not name the estimator; the "
            "ONNX backend test's reference (onnx/backend/test/case/node/instancenorm.py) uses "
            "np.var, the population (biased) variance. ONNX keeps no running statistics, so the "
            "running_* keywords are left out on purpose." + _ONNX_EPS_NOTE + " Not modelled: "
            "runtime kernels' numerics."
        ),
    ),
    Preset(
        name="onnx.group_norm",
        op="group_norm",
        kwargs={
            "eps": _F32_EPS,
            "variance": "biased",
            "eps_placement": "inside",
            "weight_offset": 0.0,
        },
        provenance=(
            "ONNX GroupNormalization, opset 21 (onnx/defs/nn/defs.cc): epsilon=1e-5 FLOAT, "
            "num_groups, stash_type=1; y = scale * (x - mean) / sqrt(variance + epsilon) + bias "
            "with statistics per instance per group (biased) and scale/bias of shape (C), per "
            "CHANNEL as in torch.nn.functional.group_norm. Opset 18 took per-GROUP scale/bias "
            "of shape (num_groups); this preset does not describe opset 18."
            + _ONNX_EPS_NOTE
            + " Not modelled: stage one in stash_type (float32, also for float64 inputs); the "
            "function body's Var = ReduceMean(X*X) - Mean*Mean; the normalised value cast to T "
            "before the affine step."
        ),
    ),
    Preset(
        name="onnx.rms_norm",
        op="rms_norm",
        kwargs={
            "eps": _F32_EPS,
            "variance": "biased",
            "eps_placement": "inside",
            "weight_offset": 0.0,
        },
        provenance=(
            "ONNX RMSNormalization, opset 23 (onnx/defs/nn/defs.cc): axis=-1, epsilon=1e-5 "
            "FLOAT, stash_type=1; XSquaredMean = ReduceMean(X*X), RMS = sqrt(XSquaredMean + "
            "epsilon), Normalized = X / RMS, Y = Normalized * Scale; no bias input."
            + _ONNX_EPS_NOTE
            + " Not modelled: stage one in stash_type (float32, also for float64 inputs); "
            "Normalized is cast back to T before the product with Scale (two roundings, the "
            "same order as HF LLaMA); Scale and Y may have their own type V."
        ),
    ),
    # --- Keras 3 ---------------------------------------------------------------------------
    Preset(
        name="keras.layer_norm",
        op="layer_norm",
        kwargs={"eps": 1e-3, "variance": "biased", "eps_placement": "inside", "weight_offset": 0.0},
        provenance=(
            "Keras 3 keras.layers.LayerNormalization "
            "(keras/src/layers/normalization/layer_normalization.py): axis=-1, epsilon=1e-3; "
            "mean and variance from ops.moments (population variance), inv = rsqrt(variance + "
            "epsilon), output = x * inv * gamma + (beta - mean * inv * gamma). epsilon stays a "
            "Python float and is added to a tensor of the compute dtype. Not modelled: eps "
            "rounded to the compute dtype (float32(1e-3) for float32), the rearranged affine "
            "arithmetic, float16/bfloat16 inputs upcast to float32 when the layer dtype is "
            "float32, and ops.moments computing Var = E[x^2] - E[x]^2 on the NumPy and Torch "
            "backends (JAX uses jnp.var). rms_scaling=True has no preset: in the version read "
            "(commit 12c5b99) it divides by sqrt(ops.var(x) + eps), a mean-centred variance, "
            "without subtracting the mean from x."
        ),
    ),
    Preset(
        name="keras.batch_norm",
        op="batch_norm",
        kwargs={
            "eps": 1e-3,
            "variance": "biased",
            "eps_placement": "inside",
            "weight_offset": 0.0,
            "running_variance": "biased",
            "momentum": 0.99,
            "momentum_weights": "running",
        },
        provenance=(
            "Keras 3 keras.layers.BatchNormalization "
            "(keras/src/layers/normalization/batch_normalization.py): momentum=0.99, "
            "epsilon=1e-3. Training normalises with the batch mean and variance from "
            "ops.moments (population, biased) and updates moving_mean = moving_mean * momentum "
            "+ mean * (1 - momentum) and moving_variance = moving_variance * momentum + "
            "variance * (1 - momentum) with that same biased batch variance: momentum weights "
            "the moving value. Inference normalises with the moving statistics. Not modelled: "
            "float16/bfloat16 inputs computed in float32, ops.moments' E[x^2] - E[x]^2 on the "
            "NumPy and Torch backends, eps rounded to the compute dtype, and the arithmetic "
            "order inside ops.batch_normalization."
        ),
    ),
    Preset(
        name="keras.group_norm",
        op="group_norm",
        kwargs={"eps": 1e-3, "variance": "biased", "eps_placement": "inside", "weight_offset": 0.0},
        provenance=(
            "Keras 3 keras.layers.GroupNormalization "
            "(keras/src/layers/normalization/group_normalization.py): groups=32, axis=-1, "
            "epsilon=1e-3; ops.moments over each group (biased), inv = rsqrt(variance + "
            "epsilon), per-channel gamma and beta. Keras is channels-LAST by default: move the "
            "channel axis to position 1 before calling the reference. Not modelled: output "
            "computed as x * inv + (beta - mean * inv), E[x^2] - E[x]^2 moments on the NumPy "
            "and Torch backends, eps rounded to the compute dtype."
        ),
    ),
    # --- Hand-written and model code ---------------------------------------------------------
    Preset(
        name="seed.layer_norm",
        op="layer_norm",
        kwargs={
            "eps": 1e-6,
            "variance": "biased",
            "eps_placement": "outside",
            "weight_offset": 0.0,
        },
        provenance=(
            "The hand-written interview LayerNorm of the project's seed document "
            "(seed-normalization-notes.txt, the 'DeepSeek interview' LayerNorm): "
            "std = x.std(-1, keepdim=True, unbiased=False) and "
            "gamma * (x - mean) / (std + eps) + beta with eps=1e-6: the biased standard "
            "deviation with eps added to it, outside the square root. As written the snippet "
            "does not run (the constructor parameter is spelled 'featurea' and it calls "
            "torch.zero); the preset captures its evident intent. Not modelled: torch's "
            "reduction kernels and the rounding of each elementwise step."
        ),
    ),
    Preset(
        name="annotated_transformer.layer_norm",
        op="layer_norm",
        kwargs={
            "eps": 1e-6,
            "variance": "unbiased",
            "eps_placement": "outside",
            "weight_offset": 0.0,
        },
        provenance=(
            "Harvard NLP, The Annotated Transformer (harvardnlp/annotated-transformer, "
            "the_annotated_transformer.py, class LayerNorm): eps=1e-6, std = x.std(-1, "
            "keepdim=True) with torch's default Bessel correction (divisor n - 1), and "
            "a_2 * (x - mean) / (std + eps) + b_2: unbiased, eps outside the root. Not "
            "modelled: each elementwise step rounds in the input dtype."
        ),
    ),
    Preset(
        name="hf.llama.rms_norm",
        op="rms_norm",
        kwargs={"eps": 1e-6, "variance": "biased", "eps_placement": "inside", "weight_offset": 0.0},
        provenance=(
            "Hugging Face transformers LlamaRMSNorm (src/transformers/models/llama/"
            "modeling_llama.py, as read in a v4.38-era revision): __init__(hidden_size, "
            "eps=1e-6), weight initialised to ones; variance = x.pow(2).mean(-1) in float32, "
            "x * rsqrt(variance + eps), scaled by weight (biased, eps inside). Model configs "
            "pass rms_norm_eps and checkpoints may set another value: override eps. Not "
            "modelled: the input is cast to float32 first (float64 inputs are computed in "
            "float32), and the normalised value is cast back to the input dtype BEFORE the "
            "product with weight ('return self.weight * hidden_states.to(input_dtype)'), so the "
            "product is a second rounding in the promoted dtype of weight and input."
        ),
    ),
    Preset(
        name="hf.gemma.rms_norm",
        op="rms_norm",
        kwargs={"eps": 1e-6, "variance": "biased", "eps_placement": "inside", "weight_offset": 1.0},
        provenance=(
            "Hugging Face transformers GemmaRMSNorm (src/transformers/models/gemma/"
            "modeling_gemma.py): __init__(dim, eps=1e-6), weight initialised to ZEROS and "
            "applied as (1 + weight) (weight_offset=1.0); x * rsqrt(mean(x^2) + eps) in float32. "
            "Unlike LLaMA the product is taken before the cast: 'Llama does x.to(float16) * w "
            "whilst Gemma is (x * w).to(float16)' (code comment citing transformers PR 29402): "
            "output * (1.0 + weight.float()) in float32, then one cast to the input dtype. Not "
            "modelled: float32 intermediates (float64 inputs are computed in float32) and "
            "1 + weight rounded to float32."
        ),
    ),
    Preset(
        name="t5.layer_norm",
        op="rms_norm",
        kwargs={"eps": 1e-6, "variance": "biased", "eps_placement": "inside", "weight_offset": 0.0},
        provenance=(
            "T5LayerNorm (Hugging Face transformers src/transformers/models/t5/modeling_t5.py): "
            "'T5 uses a layer_norm which only scales and doesn't shift, which is also known as "
            "Root Mean Square Layer Normalization' - no mean subtraction, no bias: variance = "
            "mean(x^2) accumulated in float32, x * rsqrt(variance + eps), times weight; eps = "
            "T5Config.layer_norm_epsilon = 1e-6 (also the module default). Hence op rms_norm. "
            "Not modelled: x * rsqrt(...) evaluated in the promoted float32, cast to the "
            "weight's dtype when that is float16/bfloat16, then multiplied by weight; when "
            "NVIDIA apex is installed the file swaps T5LayerNorm for apex FusedRMSNorm."
        ),
    ),
    # --- DeepNet -----------------------------------------------------------------------------
    Preset(
        name="deepnet.deep_norm",
        op="deep_norm",
        kwargs={
            "eps": 1e-5,
            "variance": "biased",
            "eps_placement": "inside",
            "weight_offset": 0.0,
            "add_rounding": "dtype",
        },
        provenance=(
            "DeepNet (Wang et al., 2022, 'DeepNet: Scaling Transformers to 1,000 Layers', "
            "arXiv:2203.00555): x_{l+1} = LN(alpha * x_l + G_l(x_l)), Post-LN with the residual "
            "scaled by a depth-dependent alpha; beta is an initialisation gain (FFN, value and "
            "output projections) and not part of the norm. The preset has no alpha: take it from "
            "deepnorm_constants() and pass arguments(alpha=...). LN is PyTorch's LayerNorm: the "
            "authors' microsoft/torchscale uses torch.nn.LayerNorm (or apex FusedLayerNorm) with "
            "eps=args.layernorm_eps, 1e-5 in its EncoderConfig/DecoderConfig, and "
            "residual_connection(x, residual) = residual * alpha + x before the norm. "
            "add_rounding='dtype': the model holds alpha * x + G(x) in its dtype. Not modelled: "
            "torchscale rounds residual * alpha and then the sum (two roundings where the "
            "reference rounds once), plus LayerNorm's kernel numerics (see pytorch.layer_norm)."
        ),
    ),
)
