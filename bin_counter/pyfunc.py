"""0.2's home of the served model and its helpers, kept importable for the 0.3 release: models logged by 0.2
import `bin_counter.pyfunc.BinCounterModel` when loaded in this process, and users' scripts import
`predict_files`, `load_model`, `log_model`. New code imports from `bin_counter.serving`."""
from bin_counter.serving.clients import (  # noqa: F401
    encode_files,
    encode_image,
    predict_files,
    read_image_file,
    request_frame,
)
from bin_counter.serving.limits import limit, max_image_bytes  # noqa: F401
from bin_counter.serving.model import (  # noqa: F401
    PATHS_REFUSED,
    VIEWS_PER_FORWARD,
    BinCounterModel,
    decode_image,
    decoders,
    image_column,
    load_model,
    prepared_batches,
    signature,
)
from bin_counter.serving.packaging import (  # noqa: F401
    PACKAGE_DIR,
    inference_graph,
    input_example,
    log_model,
    requirements,
)
