"""Chapter 1 exercise checks: solutions pass, stubs and typical mistakes get a helpful 'not yet'."""
from dslib.exercises import ch1


def stub(*args):
    raise NotImplementedError


def test_kv_bytes_per_token():
    assert ch1.check_kv_bytes_per_token(ch1.solution_kv_bytes_per_token)
    assert "stub" in ch1.check_kv_bytes_per_token(stub).message
    v = ch1.check_kv_bytes_per_token(lambda layers, kvh, hd, b: layers * kvh * hd * b)
    assert not v and "key AND a value" in v.message
    v = ch1.check_kv_bytes_per_token(lambda layers, kvh, hd, b: 2 * kvh * hd * b)
    assert not v and "one layer" in v.message
    v = ch1.check_kv_bytes_per_token(lambda layers, kvh, hd, b: 2 * layers * kvh * hd)
    assert not v and "elements, not bytes" in v.message
    assert "raised ZeroDivisionError" in ch1.check_kv_bytes_per_token(lambda *a: 1 / 0).message


def test_max_context():
    gqa, dsa = ch1.solution_max_context()
    assert (gqa, dsa) == (18_855, 98_008)
    assert ch1.check_max_context(gqa, dsa)
    assert "None" in ch1.check_max_context(None, None).message
    assert "rounds up" in ch1.check_max_context(gqa + 1, dsa).message
    assert "marketed" in ch1.check_max_context(gqa, 91_667).message
    assert "ONE request" in ch1.check_max_context(603_366, dsa).message
    assert "indexer keys" in ch1.check_max_context(gqa, 117_730).message
    assert "bf16 MLA" in ch1.check_max_context(gqa, 67_040).message
    assert "is not it" in ch1.check_max_context(gqa, 7).message


def test_generation_flops():
    assert ch1.check_generation_flops(ch1.solution_generation_flops)
    assert "stub" in ch1.check_generation_flops(stub).message
    no_cache = ch1.check_generation_flops(lambda cfg, p, n, use_cache: ch1.solution_generation_flops(cfg, p, n, False))
    assert not no_cache and "cost without a cache" in no_cache.message
    def one_too_many(cfg, p, n, use_cache):
        return ch1.solution_generation_flops(cfg, p, n + 1, use_cache)

    extra = ch1.check_generation_flops(one_too_many)
    assert not extra and "one step too many" in extra.message


def test_kv_bytes_other_mistake_names_the_case():
    v = ch1.check_kv_bytes_per_token(lambda layers, kvh, hd, b: 2 * layers * kvh * hd * b + 1)
    assert not v and "num_layers=61" in v.message and "249,856" in v.message
    assert "return a number" in ch1.check_kv_bytes_per_token(lambda *a: "many").message
