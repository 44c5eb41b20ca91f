import traceback
from hypothesis import HealthCheck, given, settings, strategies as st
from test_vmclone import take_snapshot, mutate, mutations, snapshot, console, refuse_file, SnapshotError
FOUND = {}
@settings(max_examples=6000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_fuzz(data):
    real = take_snapshot()
    ch = data.draw(mutations(real), label="change")
    blob = mutate(real, ch)
    try:
        k = snapshot.restore(snapshot.decode(blob), console(), None, refuse_file)
    except SnapshotError:
        return
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        key = (type(e).__name__, tb.filename.split('/')[-1], tb.lineno)
        if key not in FOUND:
            FOUND[key] = (str(e)[:200], repr(ch)[:300])
            print("\nBUG", key, FOUND[key], flush=True)
        return
    k.close()
