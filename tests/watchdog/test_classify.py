"""The stack classifier on synthetic stacks: which frame decides, and what is never a compile."""

from __future__ import annotations

from stethoscope.watchdog import classify_frames

SP = "/usr/lib/python3.11/site-packages"
TRAIN = [("/home/me/train.py", 40, "<module>"), (f"{SP}/torch/nn/modules/module.py", 1778, "_call_impl")]


def test_compile_frames_anywhere_win():
    frames = [
        *TRAIN,
        (f"{SP}/torch/_dynamo/eval_frame.py", 600, "_fn"),
        (f"{SP}/torch/_dynamo/convert_frame.py", 1000, "_compile"),
        (f"{SP}/torch/_dynamo/symbolic_convert.py", 500, "run"),
        (f"{SP}/sympy/core/add.py", 10, "f"),
    ]
    c = classify_frames(frames)
    assert c.kind == "compiling" and "symbolic_convert.py" in c.frame and "sympy" in c.innermost


def test_compiled_code_running_is_not_compiling():
    # eval_frame's wrapper stays on the stack while compiled code runs: a hang there is the user's.
    frames = [*TRAIN, (f"{SP}/torch/_dynamo/eval_frame.py", 600, "_fn"), ("/home/me/model.py", 12, "forward")]
    c = classify_frames(frames)
    assert c.kind == "user code" and "model.py" in c.frame


def test_cpp_extension_build_and_triton():
    assert (
        classify_frames(
            [
                *TRAIN,
                (f"{SP}/torch/utils/cpp_extension.py", 2000, "_jit_compile"),
                ("/usr/lib/python3.11/subprocess.py", 1, "run"),
            ]
        ).kind
        == "compiling"
    )
    assert classify_frames([*TRAIN, (f"{SP}/triton/compiler/compiler.py", 1, "compile")]).kind == "compiling"


def test_collective_and_data_loading():
    c = classify_frames(
        [
            *TRAIN,
            (f"{SP}/torch/distributed/c10d_logger.py", 80, "wrapper"),
            (f"{SP}/torch/distributed/distributed_c10d.py", 2500, "all_reduce"),
        ]
    )
    assert c.kind == "collective" and "all_reduce" in c.frame
    c = classify_frames(
        [
            ("/home/me/train.py", 30, "<module>"),
            (f"{SP}/torch/utils/data/dataloader.py", 700, "__next__"),
            (f"{SP}/torch/utils/data/_utils/fetch.py", 50, "fetch"),
            ("/home/me/data.py", 9, "__getitem__"),
        ]
    )
    assert c.kind == "data loading" and "fetch.py" in c.frame and "data.py" in c.innermost


def test_user_code_quotes_the_innermost_user_frame():
    c = classify_frames(
        [*TRAIN, ("/home/me/model.py", 12, "forward"), (f"{SP}/torch/nn/modules/linear.py", 125, "forward")]
    )
    assert c.kind == "user code" and c.frame == 'File "/home/me/model.py", line 12, in forward'
    assert classify_frames([]).kind == "user code"
