"""The teacher stage's library: training a teacher (`teacher.train.train_teacher`) and the
combined teachers the distill stage can learn from (`teacher.ensemble.TeacherEnsemble`,
`teacher.specialists.GeneralistSpecialists`).

Kept free of imports so that importing a submodule loads only what it needs.
"""
