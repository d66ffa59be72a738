# OPRD-Bridge on the built-in tiny task (METHOD.md §4): a teacher of another width and depth, on a
# CPU. Teacher tiny/teacher (4 layers, d = 128), student tiny/small (3 layers, d = 64; tiny.py makes
# both).
# Stage 1, the rank-8 bridge -> tiny/bridge:
# $ python distill.py config/tiny_bridge.py --method=bridge_fit
# Stage 2, OPRD through the frozen bridge:
# $ python distill.py config/tiny_bridge.py
# Everything else (rollouts, optimizer, 60 steps) is config/tiny.py's, so the run sits beside the
# other methods.
exec(open('config/tiny.py').read())
out_dir = 'tiny/oprd_bridge'
student = 'tiny/small'
teacher = 'tiny/teacher'
method = 'oprd_bridge'
distance = 'normalized_mse'   # 2(1 - cos)/r in the bridge's r dimensions
bridge_path = 'tiny/bridge'
bridge_rank = 8
bridge_rows = 16384
# the paper's 1e-4 leaves P_S far from least squares at this scale (0.54 vs 0.73)
bridge_lr = 1e-2
