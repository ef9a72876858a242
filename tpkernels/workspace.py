"""The split-K kernel's workspace: fp32 partials and int32 arrival counters, per device and stream, reused
across calls, and a pair of its own for every CUDA-graph capture."""
import torch

__all__ = ["RETIRED", "WORKSPACES", "splitk_workspace"]


# (device, stream) -> (fp32 workspace, int32 arrival counters) of eager launches. The counters are zeroed
# once, when they are allocated, and every launch leaves them at 0. Each stream has its own pair, so
# launches on two streams never share a counter; launches on one stream run in order, so they can share
# it. A CUDA graph's launches have pairs of their own (`splitk_workspace`).
WORKSPACES = {}
# Buffers a bigger pair replaced. Kept: a launch still in flight may use them.
RETIRED = []


def _current_stream(device):
    return torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0


def splitk_workspace(device, elements, tiles, stream=None):
    """An fp32 workspace of at least `elements` and `tiles` zeroed int32 counters for a split-K launch on
    `stream` (default: the current stream of `device`), reused across calls.

    During CUDA-graph capture every launch gets a pair of its own, from the graph's pool, its counters
    zeroed by a fill the graph replays: a graph replayed while its stream's eager launches run, or two
    graphs of one shape replayed on two streams, then never share a counter or a partial (a pair baked
    from the stream's cache would be shared by all of them)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return (torch.empty(elements, dtype=torch.float32, device=device),
                torch.zeros(tiles, dtype=torch.int32, device=device))
    key = (device, _current_stream(device) if stream is None else stream)
    pair = WORKSPACES.get(key)
    if pair is not None and pair[0].numel() >= elements and pair[1].numel() >= tiles:
        return pair
    if pair is not None:
        RETIRED.append(pair)
        elements = max(elements, 2 * pair[0].numel())
        tiles = max(tiles, 2 * pair[1].numel())
    pair = (torch.empty(elements, dtype=torch.float32, device=device),
            torch.zeros(tiles, dtype=torch.int32, device=device))
    WORKSPACES[key] = pair
    return pair
