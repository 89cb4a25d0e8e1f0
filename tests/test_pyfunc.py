"""The served model's request handling (pyfunc.py) without a logged model: decoding and its threads."""
import base64
import os
import threading

from torchvision import transforms

from bin_counter.core.dataset import SAMPLE_DIR
from bin_counter.pyfunc import prepared_batches


def test_concurrent_requests_share_one_bounded_pool_of_decoding_threads():
    rows = [base64.b64encode(path.read_bytes()).decode() for path in sorted((SAMPLE_DIR / "bin-images").glob("*.jpg"))
            [:40]]
    transform = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    before = set(threading.enumerate())
    requests = [prepared_batches(rows, transform, batch_size=8) for _ in range(6)]
    for request in requests:  # six requests in flight, each decoding its next batch
        rows_done, batch, failed = next(request)
        assert len(rows_done) == 8 and not failed
    started = [t for t in threading.enumerate() if t not in before]
    for request in requests:
        request.close()  # as a request answered 400 early: its queued decodes are dropped
    assert len(started) <= min(4, os.cpu_count() or 1)  # before: a pool per request, 6x as many
