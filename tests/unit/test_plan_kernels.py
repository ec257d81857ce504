"""plan/kernels.py: kernel names seen on the H200 (torch 2.11) go to the cost model's classes, and a profiled
window's per-class time, kernel count, busy and idle time by hand-computed example."""

from __future__ import annotations

import pytest

from moemesh.plan.kernels import CLASSES, TOP_KERNELS, class_profile, classify

# Names as the profiler reports them (mangled where the demangler gave up); the cutlass names are cut
# after the part that decides.
NAMES = {
    "grouped_gemm": [
        "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13GemmUniversalINS4_"
        "17GroupProblemShapeIN4cute5tupleIJiiiEEEEENS4_10collective13CollectiveMmaINS4_41MainloopSm90ArrayTmaGmma"
        "WarpSpecializedILi4ENS9_5tupleIJNS9_1CILi1EEESF_SF_EEENS4_41KernelPtrArrayTmaWarpSpecializedCooperative",
        "void at::cuda::detail::prepare_grouped_gemm_data<cutlass::bfloat16_t, cutlass::bfloat16_t, float, "
        "cute::tuple<long, cute::C<1>, cute::C<0> > >(cutlass::bfloat16_t*, ...)",
        "cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel::GemmUniversal"
        "<cutlass::gemm::GroupProblemShape<cute::tuple<int, int, int> >, ...> > >",
    ],
    "gemm": [
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
        "kernel__5x_cublas",
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(...)",
        "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false, false>(...)",
    ],
    "attention": [
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_2_64x64x128_4x1x1_kernel0_0",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
        "cutlass::bfloat16_t>, false, true, false, false, true, true, false>(...)",
        "fmha_cutlassB_bf16_aligned_64x64_k128_sm80",
    ],
    "optimizer": [
        "adamw_master",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "TensorListMetadata<1>, at::native::(anonymous namespace)::LpNormFunctor<float, (at::native::(anonymous "
        "namespace)::NormType)1, float, float>, float*, int>(...)",
        "void at::native::(anonymous namespace)::lpnorm_cleanup<float, (at::native::(anonymous namespace)::"
        "NormType)1, float, float>(...)",
    ],
    "head": [
        "void (anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::(anonymous "
        "namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)",
        "void (anonymous namespace)::cunn_SoftMaxBackward<4, float, float, float, at::native::(anonymous "
        "namespace)::LogSoftMaxBackwardEpilogue>(float*, float const*, float const*, long)",
        "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>(...)",
        "void at::native::(anonymous namespace)::nll_loss_backward_reduce_cuda_kernel_2d<float, long>(...)",
    ],
    "elementwise": [
        # the router's softmax over tokens x experts is a layer kernel, not the head's
        "void (anonymous namespace)::cunn_SoftMaxForward<2, float, float, float, at::native::(anonymous "
        "namespace)::SoftMaxForwardEpilogue>(float*, float const*, int)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
        "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)",
        "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, "
        "-2, true>(...)",
        "void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<at_cuda_detail::cub::DeviceRadixSortPolicy<long, "
        "long, unsigned int>::Policy800, false, long, long, unsigned int, int, ...>(...)",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
        "at::native::sum_functor<float, float, float>::operator()(...)",
        "_rms_norm_fwd_kernel",
        "Memcpy HtoD (Pinned -> Device)",
        "Memset (Device)",
    ],
}


@pytest.mark.parametrize("cls, name", [(cls, name) for cls, names in NAMES.items() for name in names])
def test_classify_names_seen_on_the_h200(cls, name):
    assert classify(name) == cls


def test_every_class_is_exercised():
    assert set(NAMES) == set(CLASSES)


def test_class_profile_by_hand():
    """Two steps in a 1000 us window: busy 0-450 (a side-stream copy overlaps the optimizer) and 600-900."""
    kernels = [("nvjet_a", 0.0, 300.0), ("adamw_master", 300.0, 400.0),
               ("Memcpy HtoD (Pinned -> Device)", 350.0, 450.0),  # overlaps the optimizer by 50 us
               ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_x", 600.0, 800.0), ("nvjet_a", 800.0, 900.0)]
    p = class_profile(kernels, window_us=1000.0, steps=2)
    assert p["classes"]["gemm"] == {"ms": pytest.approx(0.2), "kernels": 1.0}
    assert p["classes"]["optimizer"] == {"ms": pytest.approx(0.05), "kernels": 0.5}
    assert p["classes"]["elementwise"] == {"ms": pytest.approx(0.05), "kernels": 0.5}
    assert p["classes"]["attention"]["ms"] == pytest.approx(0.1)
    assert p["classes"]["head"] == {"ms": 0.0, "kernels": 0.0}
    assert p["busy_ms"] == pytest.approx(0.375) and p["idle_ms"] == pytest.approx(0.125)
    assert p["window_ms"] == pytest.approx(0.5) and p["kernels"] == 2.5
    assert [k["name"] for k in p["top_kernels"]][:2] == ["nvjet_a", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_x"]
    assert p["top_kernels"][0] == {"name": "nvjet_a", "class": "gemm", "ms": pytest.approx(0.2), "count": 1.0}


def test_class_profile_without_device_events():
    """A CPU run has no kernels: every class is zero and the whole window is idle."""
    p = class_profile([], window_us=2000.0, steps=2)
    assert all(v == {"ms": 0.0, "kernels": 0.0} for v in p["classes"].values())
    assert p["idle_ms"] == pytest.approx(1.0) and p["top_kernels"] == []


def test_top_kernels_are_capped():
    kernels = [(f"k{i}", 10.0 * i, 10.0 * i + i + 1) for i in range(30)]
    assert len(class_profile(kernels, 1000.0, 1)["top_kernels"]) == TOP_KERNELS
