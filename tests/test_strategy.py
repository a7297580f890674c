import numpy as np
from flwr.app import Array, ArrayRecord

from fl_lightning.strategy import restore_integer_arrays


def test_integer_buffers_get_their_dtype_back() -> None:
    reference = ArrayRecord(
        {"w": Array(np.zeros(2, np.float32)), "n": Array(np.array(3, np.int64))}
    )
    averaged = ArrayRecord(
        {"w": Array(np.array([0.5, 1.5], np.float32)), "n": Array(np.array(4.6))}
    )
    restored = restore_integer_arrays(averaged, reference)
    assert restored["n"].numpy().dtype == np.int64 and restored["n"].numpy() == 5
    assert restored["w"].numpy().dtype == np.float32
    np.testing.assert_array_equal(restored["w"].numpy(), [0.5, 1.5])
