"""Tiling geometry and the exact round trip stitch(tile(x)) == x, over random shapes."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shared.tiling import TileGrid, ramp_window, stitch, tile


@st.composite
def frames(draw, dtype):
    t = draw(st.integers(1, 24))
    o = draw(st.integers(0, t - 1))
    c = draw(st.integers(1, 3))
    h = draw(st.integers(1, 70))
    w = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        x = rng.integers(0, 256, size=(c, h, w), dtype=np.uint8)
    else:
        # spread over many magnitudes: exactness must not depend on "nice" values
        x = (rng.standard_normal((c, h, w)) * 10.0 ** rng.integers(-6, 7, (c, h, w))).astype(dtype)
    pad = draw(st.sampled_from(["reflect", "constant"]))
    return x, t, o, pad


@pytest.mark.parametrize("mode", ["blend", "center"])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_stitch_of_tile_is_identity(mode, dtype):
    @settings(max_examples=100, deadline=None)
    @given(frames(dtype))
    def check(case):
        x, t, o, pad = case
        tiles, grid = tile(x, t, o, pad_mode=pad)
        assert tiles.shape == (len(grid), x.shape[0], t, t)
        back = stitch(tiles, grid, mode=mode)
        assert back.dtype == x.dtype
        assert np.array_equal(back, x)

    check()


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), t=st.integers(1, 64), data=st.data())
def test_grid_covers_frame_with_minimal_padding(h, w, t, data):
    o = data.draw(st.integers(0, t - 1))
    g = TileGrid(h, w, t, o)
    hp, wp = g.padded_shape
    assert hp >= h and wp >= w
    # one stride less would not reach the far edge (unless a single tile already covers it)
    nr, nc = g.grid_shape
    assert nr == 1 or (nr - 2) * g.stride + t < h
    assert nc == 1 or (nc - 2) * g.stride + t < w
    pos = g.positions
    assert len(pos) == len(g) == nr * nc
    assert pos[0] == (0, 0) and pos[-1] == (hp - t, wp - t)


def test_tiles_hold_the_right_pixels_and_padding():
    x = np.arange(2 * 5 * 8, dtype=np.int32).reshape(2, 5, 8)
    # stride 3: rows ceil((5-4)/3)+1 = 2 tiles at 0,3 ; cols ceil((8-4)/3)+1 = 3 at 0,3,6
    # -> padded (3*1+4, 3*2+4) = (7, 10)
    tiles, g = tile(x, 4, 1)
    assert g.grid_shape == (2, 3) and g.padded_shape == (7, 10)
    assert g.positions == [(0, 0), (0, 3), (0, 6), (3, 0), (3, 3), (3, 6)]
    np.testing.assert_array_equal(tiles[1], x[:, 0:4, 3:7])
    # tile (3, 6) spans padded rows 3..6 and cols 6..9; padded row 5 reflects row 3,
    # padded col 8 reflects col 6
    padded = np.pad(x, ((0, 0), (0, 2), (0, 2)), mode="reflect")
    np.testing.assert_array_equal(tiles[5], padded[:, 3:7, 6:10])
    assert tiles[5][0, 2, 1] == x[0, 3, 7]
    assert tiles[5][0, 0, 2] == x[0, 3, 6]
    const, _ = tile(x, 4, 1, pad_mode="constant", constant_value=-9)
    assert const[5][0, 2, 0] == -9 and const[5][0, 0, 2] == -9 and const[5][0, 0, 0] == x[0, 3, 6]


def test_frame_smaller_than_tile_and_one_pixel():
    x = np.array([[[7.5]]], dtype=np.float32)
    tiles, g = tile(x, 8, 3)
    assert tiles.shape == (1, 1, 8, 8) and len(g) == 1
    assert np.all(tiles == 7.5)             # reflect of a single pixel is that pixel
    assert np.array_equal(stitch(tiles, g, "blend"), x)


def test_blend_averages_overlaps_with_ramp_weights():
    # two tiles of width 4 over a 1 x 6 frame, overlap 2: cols 2,3 are shared.
    g = TileGrid(1, 6, 4, 2)
    assert g.grid_shape == (1, 2) and g.padded_shape == (4, 6)
    tiles = np.zeros((2, 1, 4, 4), dtype=np.float32)
    tiles[0] = 0.0
    tiles[1] = 3.0
    out = stitch(tiles, g, "blend")[0, 0]
    # 1-D ramp for t=4, o=2: min(i+1, 4-i, 3) = [1, 2, 2, 1]; row weights cancel out.
    # col 2: tile0 at i=2 (w 2), tile1 at i=0 (w 1) -> (2*0 + 1*3) / 3 = 1
    # col 3: tile0 at i=3 (w 1), tile1 at i=1 (w 2) -> (1*0 + 2*3) / 3 = 2
    np.testing.assert_allclose(out, [0, 0, 1, 2, 3, 3])
    center = stitch(tiles, g, "center")[0, 0]
    # overlap split in half: cols 0..2 from tile 0, cols 3..5 from tile 1
    np.testing.assert_array_equal(center, [0, 0, 0, 3, 3, 3])


def test_blend_rounds_integers_instead_of_truncating():
    g = TileGrid(1, 6, 4, 2)
    tiles = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    tiles[1] = 2                             # col 2: (2*0 + 1*2)/3 = 0.67 -> 1 ; col 3: 4/3 -> 1
    np.testing.assert_array_equal(stitch(tiles, g, "blend")[0, 0], [0, 0, 1, 1, 2, 2])


def test_ramp_window_is_positive_and_flat_inside():
    w = ramp_window(8, 2)
    assert w.min() == 1 and w.max() == 9
    np.testing.assert_array_equal(w[3], [3, 6, 9, 9, 9, 9, 6, 3])
    assert np.all(ramp_window(5, 0) == 1)


@pytest.mark.parametrize("kwargs, name", [
    (dict(tile=4, overlap=4), "overlap"),
    (dict(tile=4, overlap=7), "overlap"),
    (dict(tile=0, overlap=0), "tile"),
    (dict(tile=4.0, overlap=1), "tile"),
    (dict(tile=4, overlap=-1), "overlap"),
    (dict(tile=4, overlap=True), "overlap"),
    (dict(tile=4, overlap=1, pad_mode="wrap"), "pad_mode"),
])
def test_bad_tile_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tile(np.zeros((1, 10, 10)), **kwargs)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="x must be a 3-D"):
        tile(np.zeros((10, 10)), 4)
    with pytest.raises(ValueError, match="height"):
        TileGrid(0, 5, 4, 1)
    tiles, g = tile(np.zeros((1, 10, 10)), 4, 1)
    with pytest.raises(ValueError, match="mode"):
        stitch(tiles, g, mode="mean")
    with pytest.raises(ValueError, match="tiles holds 3 tiles but the grid has 9"):
        stitch(tiles[:3], g)
    with pytest.raises(ValueError, match=r"tiles must be an array \(N, K, 4, 4\)"):
        stitch(tiles[:, :, :3], g)
    with pytest.raises(ValueError, match="grid"):
        stitch(tiles, (10, 10, 4, 1))
