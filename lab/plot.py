"""lab/study.py's figure: test accuracy against steps, one panel per student (the main one and the
smaller one), each method's mean and min-max band over seeds, a method in the same colour in both
panels.

$ python -m lab.study    # writes figures/study.png through save() below
"""
import statistics


def label_colours(res):
    """One colour per row label, the same in both panels: a method both students run keeps its
    colour."""
    import matplotlib
    labels = list(dict.fromkeys(entry['label']
                                for part in ('main', 'small') for entry in res[part]))
    palette = matplotlib.colormaps['tab20'].colors
    palette = palette[::2] + palette[1::2]  # the ten strong shades first, then their light ones
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def draw(res):
    """The figure: test accuracy against steps, one panel per student, mean and min-max band over
    seeds."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps = list(range(0, res['steps'] + 1, res['eval_every']))
    colour = label_colours(res)
    fig, axes = plt.subplots(1, 2, figsize=(12, 6), sharey=True)
    for ax, part in zip(axes, ('main', 'small')):
        who = 'student' if part == 'main' else 'small'
        for entry in res[part]:
            percent = [[100 * x for x in seed] for seed in entry['curves']]
            ax.plot(steps, [statistics.mean(col) for col in zip(*percent)], marker='o',
                    markersize=3, color=colour[entry['label']],
                    label=f"{entry['label']} (lr {entry['lr']})")
            lowest = [min(col) for col in zip(*percent)]
            highest = [max(col) for col in zip(*percent)]
            ax.fill_between(steps, lowest, highest, color=colour[entry['label']], alpha=0.15)
        ax.axhline(100 * res['base']['teacher']['test'], color='k', ls='--', lw=1, label='teacher')
        ax.set(title=f"{who} ({res['shapes'][who]})", xlabel='step', xticks=steps)
        ax.grid(alpha=0.3)
        # below: clear of the lines
        ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.12), ncol=2)
    axes[0].set_ylabel('test accuracy (%), greedy')
    fig.tight_layout()
    return fig


def save(res, path):
    import matplotlib.pyplot as plt
    fig = draw(res)
    fig.savefig(path, dpi=110)
    plt.close(fig)
