import torch
from torch import nn

from compresskit.distill.cache import CachedTeacher
from compresskit.distill.objective import build_objective


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        self.calls = 0
        self.samples = 0

    def forward(self, x):
        self.calls += 1
        self.samples += x.shape[0]
        return self.net(x)


def test_cached_teacher_is_exact_and_runs_each_sample_once():
    torch.manual_seed(0)
    teacher = Counting().eval()
    cached = CachedTeacher(teacher).eval()
    x = torch.randn(6, 1, 4, 4)
    with torch.no_grad():
        first = cached(x)
        again = cached(x[[5, 0, 3]])
        mixed = cached(torch.cat([x[:2], torch.randn(2, 1, 4, 4)]))
        direct = teacher(x)
    assert torch.equal(first, direct)
    assert torch.equal(again, direct[[5, 0, 3]])
    assert torch.equal(mixed[:2], direct[:2])
    # 6 first, 0 on the repeat, 2 new ones in the mixed batch, plus the direct call
    assert teacher.samples == 6 + 2 + 6
    assert cached.hits == 3 + 2 and cached.misses == 6 + 2


def test_cached_teacher_in_objective_gives_the_same_loss():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    teacher = Counting()
    terms = [{"method": "ce", "weight": 0.1}, {"method": "kd", "weight": 0.9, "temperature": 4.0}]
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    plain = build_objective(terms, student=student, teacher=teacher, example_input=x[:2])
    cached = build_objective(terms, student=student, teacher=CachedTeacher(teacher), example_input=x[:2])
    for _ in range(3):
        assert torch.allclose(plain(x, y).loss, cached(x, y).loss)
    plain.close()
    cached.close()


def test_grad_mode_bypasses_the_cache():
    teacher = Counting()
    cached = CachedTeacher(teacher)
    cached(torch.randn(2, 1, 4, 4))
    assert not cached.store and teacher.calls == 1
