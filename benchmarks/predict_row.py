"""Write a copy's prediction before any victim trains on it: the amplitude rule of a predictions file at the copy's
measured ROI PSNR, appended to that file as a row (issue 29: "predict, then measure").

    python benchmarks/predict_row.py --predictions benchmarks/results/acdc_predictions_<date>.json \
        --clean $nnUNet_raw/Dataset027_ACDC --copy $nnUNet_raw/Dataset630_ACDC_EMsw4 --cell EM-samplewise@4/255 \
        --eps 4/255 --noda "0.3-1.0" --noda-why "..." --noda-written 2026-12-07T17:50Z --command "how the copy was made"

The rule is the file's own (``rule``: x50, s and their 90% intervals); the row's ``predicted_ratio`` is the logistic
1 / (1 + exp((x50 - x) / s)) at x = the copy's mean ROI PSNR over the training cases it shares with the clean
dataset (``evaluate.image_quality``), ``predicted_ratio_range`` the logistic at the corners of the intervals.
``method`` comes from the copy's dataset.json (its ``voxshield`` entry). An expectation for the no-augmentation
victim (no rule covers it) is text written by hand, with the time it was written (``--noda-written``: before the
protector trained, for a trained copy). A purified cell (``--defence``: the exploiter purifies the copy before the
stock victim, scored against the same victim on the purified clean data) has no rule either: its row keeps the copy's
PSNRs and holds the hand-written ``--expect`` as ``predicted_stock`` and/or ``--noda`` for the no-augmentation victim
(benchmarks/acdc.py reads them so), and its cell name ends in ``+<defence>``. A cell already in the file is refused;
the file is rewritten atomically.
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from amplitude_rule import logistic  # noqa: E402

from nnunetv2_voxshield.dataset_io import write_json_atomic  # noqa: E402
from nnunetv2_voxshield.evaluate import image_quality  # noqa: E402


def prediction_row(rule: dict, quality: dict, cell: str, method: str, dataset: str, written: str) -> dict:
    """The row for one copy: its PSNRs (``image_quality``'s summary) and the rule's ratio with its range."""
    x = quality['psnr_roi']['mean']
    corners = [float(logistic(x, a, s)) for a in rule['x50_ci'] for s in rule['s_ci']]
    return {'cell': cell, 'method': method, 'dataset': dataset, 'psnr_whole': quality['psnr']['mean'],
            'psnr_roi': x, 'psnr_roi_std': quality['psnr_roi']['std'],
            'predicted_ratio': float(logistic(x, rule['x50'], rule['s'])),
            'predicted_ratio_range': [min(corners), max(corners)], 'written': written}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--predictions', required=True, help='the predictions JSON (with its rule) to append to')
    parser.add_argument('--clean', required=True, help='the clean raw dataset folder')
    parser.add_argument('--copy', required=True, help='the protected copy (raw dataset folder)')
    parser.add_argument('--cell', required=True, help='the cell name, e.g. EM-samplewise@4/255')
    parser.add_argument('--eps', default=None, help='the budget as written, e.g. 4/255 (none for PSNR-only methods)')
    parser.add_argument('--note', default='', help='how the copy was made and what the prediction rests on')
    parser.add_argument('--noda', default=None, help='the expectation for the no-augmentation victim (text)')
    parser.add_argument('--noda-why', default='', help='why that expectation')
    parser.add_argument('--noda-written', default=None, help='when the expectation was written (UTC, ISO)')
    parser.add_argument('--defence', default=None, help='a purified cell: the purification before the stock victim '
                                                        '(defences.py spec, e.g. zresample)')
    parser.add_argument('--expect', default=None, help='with --defence: the expectation written for the stock victim')
    parser.add_argument('--expect-why', default='', help='why that expectation')
    parser.add_argument('--victims', nargs='+', default=['2d (nnUNetTrainer_20epochs, nnUNetPlans_cpu)',
                                                         '2d (nnUNetTrainerNoDA_20epochs, nnUNetPlans_cpu)'])
    parser.add_argument('--command', required=True, help='the commands that made the copy (provenance)')
    args = parser.parse_args(argv)
    predictions_file, copy = Path(args.predictions), Path(args.copy)
    try:
        predictions = json.loads(predictions_file.read_text())
        rule = predictions['rule']
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f'{predictions_file}: not a predictions file with a rule ({type(e).__name__}: {e})')
    if any(r['cell'] == args.cell for r in predictions['rows']):
        sys.exit(f'{predictions_file}: cell {args.cell!r} is already there (a prediction is written once)')
    try:
        meta = json.loads((copy / 'dataset.json').read_text())['voxshield']
        method = meta['method']
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f'{copy / "dataset.json"}: no voxshield method ({type(e).__name__}: {e})')
    if args.noda is not None and not args.noda_written:
        sys.exit('--noda needs --noda-written: when the expectation was written')
    if args.defence is not None:
        from nnunetv2_voxshield.defences import parse_defence
        try:
            parse_defence(args.defence)
        except ValueError as e:
            sys.exit(f'--defence: {e}')
        if not (args.expect or args.noda) or not args.cell.endswith(f'+{args.defence}'):
            sys.exit(f'--defence {args.defence} needs --expect and/or --noda (no rule covers a purification) and a '
                     f'cell named <copy cell>+{args.defence}, not {args.cell!r}')
    elif args.expect is not None:
        sys.exit('--expect is for a purified cell (--defence); the rule predicts an unpurified one')
    quality = image_quality(args.clean, str(copy), '.nii.gz')['summary']
    now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%MZ')
    row = prediction_row(rule, quality, args.cell, method, copy.name, now)
    row.update({'eps': args.eps, 'note': args.note, 'victims': args.victims,
                **({'strength': meta['strength']} if meta.get('strength') is not None else {})})
    if args.noda is not None:
        row['predicted_noda'] = {'text': args.noda, 'why': args.noda_why, 'written': args.noda_written}
    if args.defence is not None:
        row.update({'defence': args.defence, 'predicted_ratio': None, 'predicted_ratio_range': None,
                    **({'predicted_stock': {'text': args.expect, 'why': args.expect_why, 'written': now}}
                       if args.expect else {})})
    predictions['rows'].append(row)
    predictions['provenance']['command'] += (f'; {args.cell} row (written {now}, before its victims, by '
                                             f'benchmarks/predict_row.py): {args.command}')
    write_json_atomic(predictions, str(predictions_file))
    said = (f'expected {args.expect or args.noda} (written)' if args.defence
            else f'predicted {row["predicted_ratio"]:.3f} '
                 f'({row["predicted_ratio_range"][0]:.3f}-{row["predicted_ratio_range"][1]:.3f})')
    print(f'{args.cell}: ROI PSNR {row["psnr_roi"]:.2f} dB, {said} -> {predictions_file}')


if __name__ == '__main__':
    main()
