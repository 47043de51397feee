"""The audit's exploiter panel as data: named profiles (a victim trainer, configuration, plans and an optional
purification of the training data before it), presets of them, user profiles and panel files.

A profile's trainer is a class name nnU-Net finds (``recursive_find_trainer_class_by_name``: its own trainers plus
the ``nnUNet_extTrainer`` folders, as ``nnUNetv2_train`` does); with victim epochs N the stock-named schedule
``<trainer>_<N>epochs`` (``nnUNetTrainer_1epoch``) is trained instead. A purification profile trains the same victim
on the purified protected copy and, beside it, on the purified clean data: what the purification alone costs.
"""
import contextlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence


class PanelError(ValueError):
    """A bad panel (unknown preset, trainer, defence or malformed profile); one line."""


@dataclass(frozen=True)
class Profile:
    """One exploiter: a victim trainer, its configuration, plans and an optional purification before it."""
    name: str
    trainer: str                          # trainer class (its schedule: Panel.epochs)
    configuration: str = '3d_fullres'
    plans: Optional[str] = None           # None: the panel's plans; else stock plans name (+ '_<preset>')
    defence: Optional[str] = None         # purification spec (defences.py) before the victim
    scheduled: bool = True                # False: a user's class, trained as named (no _<N>epochs)


@dataclass
class Panel:
    """An exploiter panel: its profiles, the victim seeds, epochs (None: each trainer's schedule) and plans."""
    name: str
    profiles: List[Profile]
    seeds: List[int] = field(default_factory=lambda: [0])
    epochs: Optional[int] = None          # None: each trainer's own schedule
    plans: str = 'nnUNetPlans'            # the dataset's own plans, or e.g. nnUNetPlans_cpu (plans.py preset)

    def trainer(self, p: Profile) -> str:
        """The class a profile trains: ``<trainer>_<N>epochs`` with victim epochs N (stock naming), else as named."""
        if self.epochs is None or not p.scheduled:
            return p.trainer
        return f'{p.trainer}_1epoch' if p.trainer == 'nnUNetTrainer' and self.epochs == 1 \
            else f'{p.trainer}_{self.epochs}epochs'

    def plans_of(self, p: Profile) -> str:
        """The plans a profile's victims train with: its own, else the panel's."""
        return p.plans or self.plans

    def to_json(self) -> dict:
        """The panel as a JSON-serialisable dict (for audit.json and the report)."""
        return {'name': self.name, 'seeds': self.seeds, 'epochs': self.epochs, 'plans': self.plans,
                'profiles': [asdict(p) for p in self.profiles]}


def resenc_plans(plans: str) -> str:
    """'nnUNetPlans_cpu' -> 'nnUNetResEncUNetMPlans_cpu', 'nnUNetPlans' -> 'nnUNetResEncUNetMPlans' (same preset)."""
    return re.sub(r'^[A-Za-z]*Plans', 'nnUNetResEncUNetMPlans', plans)


STOCK = Profile('stock', 'nnUNetTrainer')
PROFILES = {
    'stock': STOCK,
    '2d': Profile('2d', 'nnUNetTrainer', '2d'),
    'resencM': Profile('resencM', 'nnUNetTrainer', plans='resenc'),     # plans filled in by build_panel
    'noda': Profile('noda', 'nnUNetTrainerNoDA'),                       # the paper's victim (no augmentation)
    'labelaware': Profile('labelaware', 'nnUNetTrainerLabelAware'),     # victim_profiles.py
    **{d: Profile(d, 'nnUNetTrainer', defence=d) for d in ('blur', 'zmedian', 'zresample', 'quantise')},
}
PRESETS = {
    'quick': (['stock', 'noda'], [0]),
    'standard': (['stock', '2d', 'noda', 'labelaware', 'blur', 'zmedian'], [0, 1]),
    'full': (list(PROFILES), [0, 1, 2]),
}


def parse_exploiter(text: str) -> Profile:
    """'NAME=TrainerClass[:configuration][:plans]' -> a user profile (trained as named)."""
    name, eq, rest = text.partition('=')
    parts = rest.split(':') if eq else []
    if not eq or not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.-]*', name) or not parts[0] or len(parts) > 3:
        raise PanelError(f'--exploiter {text!r}: expected NAME=TrainerClass[:configuration][:plans]')
    return Profile(name, parts[0], parts[1] if len(parts) > 1 and parts[1] else '3d_fullres',
                   parts[2] if len(parts) > 2 and parts[2] else None, scheduled=False)


def load_panel_file(path: str) -> dict:
    """A JSON or YAML panel: {'profiles': [{'name', 'trainer', 'configuration'?, 'plans'?, 'defence'?}, ...] or
    preset names, 'seeds'?, 'epochs'?, 'plans'?}."""
    try:
        with open(path) as f:
            text = f.read()
        if path.endswith(('.yaml', '.yml')):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as e:
        raise PanelError(f'{path}: cannot read the panel ({str(e).splitlines()[0]})') from None
    if not isinstance(data, dict) or not isinstance(data.get('profiles'), list) or not data['profiles']:
        raise PanelError(f'{path}: a panel file needs a non-empty list "profiles"')
    return data


def _file_profile(entry, path: str) -> Profile:
    if isinstance(entry, str):
        if entry not in PROFILES:
            raise PanelError(f'{path}: unknown profile {entry!r} (built in: {", ".join(PROFILES)})')
        return PROFILES[entry]
    keys = {'name', 'trainer', 'configuration', 'plans', 'defence'}
    if not isinstance(entry, dict) or not {'name', 'trainer'} <= set(entry) or set(entry) - keys:
        raise PanelError(f'{path}: profile {entry!r} needs "name" and "trainer" (optional: configuration, plans, '
                         f'defence)')
    return Profile(str(entry['name']), str(entry['trainer']), entry.get('configuration') or '3d_fullres',
                   entry.get('plans'), entry.get('defence'), scheduled=False)


def build_panel(panel: Optional[str] = 'quick', panel_file: Optional[str] = None, exploiters: Sequence[str] = (),
                seeds: Optional[Sequence[int]] = None, epochs: Optional[int] = None,
                plans: Optional[str] = None) -> Panel:
    """The panel of a command line: a preset and/or a panel file, plus ``--exploiter`` profiles; options win."""
    from nnunetv2_voxshield.defences import parse_defence
    profiles: List[Profile] = []
    preset_seeds, file_data = [0], {}
    if panel is not None:
        if panel not in PRESETS:
            raise PanelError(f'--panel {panel!r}: unknown panel (choose from {", ".join(PRESETS)})')
        names, preset_seeds = PRESETS[panel]
        profiles += [PROFILES[n] for n in names]
    if panel_file:
        file_data = load_panel_file(panel_file)
        profiles += [_file_profile(e, panel_file) for e in file_data['profiles']]
    profiles += [parse_exploiter(e) for e in exploiters]
    if not profiles:
        raise PanelError('empty panel: give --panel, --panel-file or --exploiter')
    plans = plans or file_data.get('plans') or 'nnUNetPlans'
    profiles = [Profile(p.name, p.trainer, p.configuration, resenc_plans(plans), p.defence, p.scheduled)
                if p.plans == 'resenc' else p for p in profiles]
    names = [p.name for p in profiles]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PanelError(f'exploiter name(s) used twice: {", ".join(dup)}')
    for p in profiles:
        if p.defence is not None:
            try:
                parse_defence(p.defence)
            except ValueError as e:
                raise PanelError(f'exploiter {p.name}: {e}') from None
    seeds = [int(s) for s in dict.fromkeys(seeds if seeds else file_data.get('seeds') or preset_seeds)]
    epochs = epochs if epochs is not None else file_data.get('epochs')
    if epochs is not None and int(epochs) < 1:
        raise PanelError(f'--epochs {epochs}: must be at least 1')
    return Panel(panel or os.path.basename(panel_file or 'custom'), profiles, seeds,
                 None if epochs is None else int(epochs), plans)


def missing_trainers(names: Sequence[str]) -> List[str]:
    """The trainer classes nnU-Net cannot find (its own lookup over nnunetv2.training.nnUNetTrainer and the
    ``nnUNet_extTrainer`` folders, as run_training.py does), silenced."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    missing = []
    for name in dict.fromkeys(names):
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                recursive_find_trainer_class_by_name(name)
            except (RuntimeError, AssertionError):
                missing.append(name)
    return missing


def check_trainers(panel: Panel) -> Dict[str, str]:
    """{profile: trainer class}; PanelError naming the first profile whose class nnU-Net cannot find."""
    trainers = {p.name: panel.trainer(p) for p in panel.profiles}
    missing = set(missing_trainers(list(trainers.values())))
    for p in panel.profiles:
        if trainers[p.name] in missing:
            raise PanelError(f'exploiter {p.name}: trainer class {trainers[p.name]} not found (nnU-Net\'s trainers '
                             f'and nnUNet_extTrainer={os.environ.get("nnUNet_extTrainer", "")})')
    return trainers
