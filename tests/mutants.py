"""Mutation testing as a habit: put one realistic bug at a time into a scratch copy of the repository, run the tests
that must catch it, and print caught / survived.

    nice -n 19 python tests/mutants.py              # every mutant (10-15 minutes on 2 cores)
    python tests/mutants.py --fast                  # the 13 whose tests build no model (2 minutes; CI)
    python tests/mutants.py --only monet_cosine_over_tokens sft_resume_ignored
    python tests/mutants.py --list

The copy holds the working tree's tracked and untracked, not ignored, files (so uncommitted tests count); the
repository itself is never touched. A mutant whose original text is not found exactly once is reported ``stale``
(the code moved: update the mutant). Exit status 0 only when every mutant run is caught. The mutants come from the
bugs this field has had: the released-code defects in docs' fidelity table (cosine over the token axis, the target
leaking into its own prediction), off-by-one latent positions, wrong axes, sign flips, masks, resume, sampling and
scoring.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: list[str]  # pytest node ids that must fail with the mutant in place
    fast: bool = False  # its tests build no model: seconds each (CI runs these)


MUTANTS = [
    # -- objectives: positions, axes, targets --------------------------------------------------------------------------
    Mutant("monet_cosine_over_tokens", "vlatent/methods/monet.py",
           "F.cosine_similarity(student.float(), teacher.float(), dim=-1)",
           "F.cosine_similarity(student.float(), teacher.float(), dim=1)",
           ["tests/test_monet.py::test_alignment_is_one_minus_cosine_over_the_hidden_axis"], fast=True),
    Mutant("monet_stage3_slot_shifted", "vlatent/methods/monet.py",
           "student = torch.stack([h[b, t] for h in out.hidden_states])",
           "student = torch.stack([h[b, t - 1] for h in out.hidden_states])",
           ["tests/test_monet.py::test_stage3_pairs_the_i_th_student_slot_with_the_i_th_teacher_slot"]),
    Mutant("monet_stage3_teacher_without_mask", "vlatent/methods/monet.py",
           "mask = self.stage2_mask(teacher, tbatch, embeds.dtype)",
           'mask = tbatch["attention_mask"]',
           ["tests/test_monet.py::test_stage3_pairs_the_i_th_student_slot_with_the_i_th_teacher_slot"]),
    Mutant("monet_observation_weight_off_by_one", "vlatent/methods/monet.py",
           'weights = torch.where(batch["observation_mask"][:, 1:][keep]',
           'weights = torch.where(batch["observation_mask"][:, :-1][keep]',
           ["tests/test_monet.py::test_stage1_weighted_ce"]),
    Mutant("monet_stage2_mask_start_token_sees_image", "vlatent/methods/monet.py",
           "allowed[b, s + 1:pads, a:e + 1] = True", "allowed[b, s:pads, a:e + 1] = True",
           ["tests/test_monet.py::test_stage2_mask_rules"]),
    Mutant("mirage_alignment_reads_the_slot", "vlatent/methods/mirage.py",
           "self._alignment(hidden[b, t - 1], targets)", "self._alignment(hidden[b, t], targets)",
           ["tests/test_model.py::test_mirage_stage1_teacher_forces_pooled_targets"]),
    Mutant("mirage_pooling_chunks", "vlatent/methods/mirage.py",
           "torch.tensor_split(features, k)", "torch.chunk(features, k)",
           ["tests/test_model.py::test_pool_to_k_remainder_rule"], fast=True),
    Mutant("lm_loss_unshifted", "vlatent/model.py",
           "logits = self.backbone.logits(hidden[:, :-1][keep]).float()",
           "logits = self.backbone.logits(hidden[:, 1:][keep]).float()",
           ["tests/test_objectives.py::test_mirage_stage1_ce_is_next_token_ce_on_the_labelled_positions"]),
    Mutant("sketchpad_head_reads_the_target", "vlatent/methods/sketchpad.py",
           "self.head(states[b, t - 1].view(", "self.head(states[b, t].view(",
           ["tests/test_objectives.py::test_sketchpad_stage2_losses_recomputed_per_sketch"]),
    Mutant("sketchpad_own_target_in_context", "vlatent/methods/sketchpad.py",
           "[(targets[j], self.head.sketch_coords) for j in range(s) if seg_rows[j] == row]",
           "[(targets[j], self.head.sketch_coords) for j in range(s + 1) if seg_rows[j] == row]",
           ["tests/test_objectives.py::test_sketchpad_stage2_losses_recomputed_per_sketch"]),
    Mutant("sketchpad_places_transposed", "vlatent/methods/sketchpad.py",
           "[(row.flatten() + 0.5) / (rows * merge), (col.flatten() + 0.5) / (cols * merge)]",
           "[(col.flatten() + 0.5) / (cols * merge), (row.flatten() + 0.5) / (rows * merge)]",
           ["tests/test_sketchpad.py::test_grid_coords_are_each_vectors_centre_in_runs_of_merged_patches",
            "tests/test_objectives.py::test_sketchpad_stage2_losses_recomputed_per_sketch"]),
    Mutant("sketchpad_head_beside_stage1_reaches_the_lm", "vlatent/methods/sketchpad.py",
           "states = hidden.detach() if beside and not c.head_trains_states else hidden", "states = hidden",
           ["tests/test_sketchpad.py::test_head_in_stage1_trains_the_head_and_leaves_the_backbone_to_ce"]),
    Mutant("sketchpad_mse_for_l1", "vlatent/methods/sketchpad.py",
           "error = (drawn.float() - true.float()).abs().mean(-1)",
           "error = (drawn.float() - true.float()).pow(2).mean(-1)",
           ["tests/test_objectives.py::test_sketchpad_stage2_losses_recomputed_per_sketch"]),
    Mutant("sketchpad_changed_across_rows", "vlatent/methods/sketchpad.py",
           "later[1:] = rows[1:] == rows[:-1]", "later[1:] = True",
           ["tests/test_sketchpad.py::test_changed_weight_counts_the_cells_a_step_adds_more"]),
    Mutant("monet_centre_over_every_slot", "vlatent/methods/monet.py",
           "mean = slot_means(teacher_states, self.config.num_latent_tokens)", "mean = slot_means(teacher_states, 1)",
           ["tests/test_monet.py::test_stage3_pairs_the_i_th_student_slot_with_the_i_th_teacher_slot"]),
    Mutant("sketchpad_generation_without_image_context", "vlatent/methods/sketchpad.py",
           "context = self.image_context(backbone, batch[\"input_ids\"], batch.get(\"pixel_values\"),",
           "context = self.image_context(backbone, batch[\"input_ids\"], None,",
           ["tests/test_objectives.py::"
            "test_sketchpad_generated_sketch_is_the_head_on_its_own_teacher_forced_sequence"]),
    Mutant("bottleneck_start_tokens_visible", "vlatent/methods/base.py",
           "return (idx <= first_start) | starts, (idx > first_start) & ~starts",
           "return idx <= first_start, (idx > first_start) & ~starts",
           ["tests/test_bottleneck.py::"
            "test_blind_positions_see_only_what_follows_the_first_latent_start"], fast=True),
    Mutant("bottleneck_cached_step_masks_the_first_row", "vlatent/generation.py",
           "blind = opened & ~is_start", "blind = ~is_start",
           ["tests/test_bottleneck.py::test_generation_text_after_the_latents_follows_them_alone",
            "tests/test_bottleneck.py::test_cached_decode_matches_the_reference_loop_with_several_segments",
            "tests/test_bottleneck.py::test_a_swap_under_the_bottleneck_writes_the_donors_continuation"]),
    Mutant("monet_stage2_ignores_bottleneck", "vlatent/methods/monet.py",
           'allowed &= model.bottleneck_allowed(ids, batch["attention_mask"])', "pass",
           ["tests/test_monet.py::test_stage2_with_the_bottleneck_hides_the_question_from_all_after_the_first_start"]),
    Mutant("donor_column_judges_the_next_example", "bench/learning.py",
           'judge(bench, examples[d], r.generation.text)', "judge(bench, examples[(d + 1) % len(examples)], "
           "r.generation.text)", ["tests/test_learning.py::test_the_swap_judged_against_its_donor"]),
    Mutant("vlpo_scoring_ignores_bottleneck", "vlatent/training/vlpo.py",
           "positions, model.decoder_mask(sequence, embeds.dtype),", 'positions, sequence["attention_mask"],',
           ["tests/test_vlpo.py::test_rollouts_score_each_latent_with_the_state_that_produced_it"]),
    Mutant("cocova_unet_head_count_as_width", "vlatent/methods/cocova.py",
           "attention_head_dim=tuple(ch // 8 for ch in c.unet_channels))", "attention_head_dim=8)",
           ["tests/test_cocova.py::test_unet_attention_heads_are_eight_wide"]),
    Mutant("cocova_contrastive_one_view", "vlatent/methods/cocova.py",
           "for v in (visual, text)) / 2", "for v in (visual,)) / 2",
           ["tests/test_objectives.py::test_cocova_contrastive_is_symmetric_infonce_on_centred_pooled_views"]),
    Mutant("cocova_text_span_off_by_one", "vlatent/methods/cocova.py",
           'batch["input_ids"][row, pad + 1:stop]', 'batch["input_ids"][row, pad + 2:stop]',
           ["tests/test_objectives.py::test_cocova_contrastive_is_symmetric_infonce_on_centred_pooled_views"]),
    Mutant("cocova_diffusion_x0_target", "vlatent/methods/cocova.py",
           "return F.mse_loss(predicted.float(), noise.float())",
           "return F.mse_loss(predicted.float(), images.float())",
           ["tests/test_objectives.py::test_cocova_diffusion_predicts_the_noise_of_the_ddpm_forward_process"]),
    # -- labels -----------------------------------------------------------------------------------------------------
    Mutant("turn_end_not_supervised", "vlatent/data/collator.py",
           "for p in range(head + 1, min(end + 1, len(ids))):", "for p in range(head + 1, min(end, len(ids))):",
           ["tests/test_backbones.py::test_labels_cover_the_assistant_turns_only"]),
    Mutant("latent_pads_supervised", "vlatent/data/collator.py",
           "if ids[p] not in self.not_supervised:", "if True:",
           ["tests/test_objectives.py::test_mirage_stage1_ce_is_next_token_ce_on_the_labelled_positions"]),
    # -- VLPO -------------------------------------------------------------------------------------------------------
    Mutant("vlpo_clip_bounds_swapped", "vlatent/training/vlpo.py",
           "clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)",
           "clipped = torch.clamp(ratio, 1 - epsilon_high, 1 + epsilon)",
           ["tests/test_vlpo.py::test_ratio_clipping_and_dual_clip"], fast=True),
    Mutant("vlpo_kl_direction", "vlatent/training/vlpo.py",
           "diff = torch.clamp(ref_log_probs - log_probs,", "diff = torch.clamp(log_probs - ref_log_probs,",
           ["tests/test_objectives.py::test_vlpo_loss_is_the_clipped_surrogate_plus_beta_kl"]),
    Mutant("vlpo_biased_group_std", "vlatent/training/vlpo.py",
           "centred = centred / (groups.std(1, keepdim=True) + 1e-4)",
           "centred = centred / (groups.std(1, keepdim=True, unbiased=False) + 1e-4)",
           ["tests/test_vlpo.py::test_group_advantages_including_an_all_equal_group"], fast=True),
    Mutant("vlpo_latent_scored_by_its_own_slot", "vlatent/training/vlpo.py",
           "states = hidden[:, p - 1 : -1]", "states = hidden[:, p:]",
           ["tests/test_vlpo.py::test_rollouts_score_each_latent_with_the_state_that_produced_it"]),
    Mutant("vlpo_gaussian_one_sigma", "vlatent/training/vlpo.py",
           "- d * math.log(sigma)", "- math.log(sigma)",
           ["tests/test_vlpo.py::test_gaussian_log_prob_of_a_stored_latent"], fast=True),
    # -- sampling ---------------------------------------------------------------------------------------------------
    Mutant("top_p_one_token_short", "vlatent/generation.py",
           "drop = sorted_probs.cumsum(-1) - sorted_probs > top_p", "drop = sorted_probs.cumsum(-1) > top_p",
           ["tests/test_sampling.py::test_top_p_keeps_the_smallest_prefix_reaching_p"], fast=True),
    Mutant("temperature_ignored", "vlatent/generation.py",
           "probs = torch.softmax(logits / temperature, dim=-1)", "probs = torch.softmax(logits, dim=-1)",
           ["tests/test_sampling.py::test_temperature_scales_the_logits"], fast=True),
    Mutant("sampling_generator_dropped", "vlatent/generation.py",
           "torch.multinomial(probs, 1, generator=generator)", "torch.multinomial(probs, 1)",
           ["tests/test_sampling.py::test_different_seeds_draw_different_text_and_a_seed_repeats"]),
    # -- resume -----------------------------------------------------------------------------------------------------
    Mutant("sft_resume_ignored", "train/sft.py",
           "trainer.train(resume_from_checkpoint=last)", "trainer.train(resume_from_checkpoint=None)",
           ["tests/test_resume.py::test_sft_resume_continues_from_the_checkpoint",
            "tests/test_resume.py::test_vlpo_resume_continues_from_the_checkpoint"]),
    Mutant("generator_state_not_restored", "vlatent/training/trainer.py",
           "                g.set_state(saved[name])", "                pass",
           ["tests/test_resume.py::test_vlpo_resume_samples_what_the_uninterrupted_run_samples",
            "tests/test_resume.py::test_sketchpad_resume_redraws_the_uninterrupted_runs_rerenderings"]),
    # -- scoring ----------------------------------------------------------------------------------------------------
    Mutant("mmmu_first_mention_wins", "vlatent/scoring/mmmu.py",
           "haystack.rfind(mention[letter])", "haystack.find(mention[letter])",
           ["tests/test_answer_fuzz.py::test_mmmu_multiple_choice_matches_the_official_parser"], fast=True),
    Mutant("mmmu_quote_not_stripped", "vlatent/scoring/mmmu.py",
           '_EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":", "\'")',
           '_EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":")',
           ["tests/test_answer_fuzz.py::test_mmmu_multiple_choice_matches_the_official_parser"], fast=True),
    Mutant("mmmu_text_rule_word_count", "vlatent/scoring/mmmu.py",
           "if len(padded.split()) > 5:", "if len(padded.split()) >= 5:",
           ["tests/test_answer_fuzz.py::test_mmmu_multiple_choice_matches_the_official_parser"], fast=True),
    Mutant("mmstar_letters_case_insensitive", "vlatent/scoring/mmstar.py",
           "words = answer.translate(_SEPARATORS).split()", "words = answer.upper().translate(_SEPARATORS).split()",
           ["tests/test_answer_fuzz.py::test_mmstar_matches_vlmevalkit_can_infer"], fast=True),
    Mutant("mmstar_text_first_of_several", "vlatent/scoring/mmstar.py",
           "return hits[0] if len(hits) == 1 else None", "return hits[0] if hits else None",
           ["tests/test_answer_fuzz.py::test_mmstar_matches_vlmevalkit_can_infer"], fast=True),
]


def scratch_copy(dest: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files, copied under ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(copy: Path, tests: list[str], timeout: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--fast", action="store_true", help="only the mutants whose tests take seconds")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the selected tests unmutated first")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run (default 900)")
    args = ap.parse_args(argv)

    chosen = [m for m in MUTANTS if (not args.only or m.name in args.only) and (not args.fast or m.fast)]
    unknown = set(args.only or []) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutant(s) {', '.join(sorted(unknown))}; see --list")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:45s} {m.path:32s} {' '.join(m.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="vlatent-mutants-") as tmp:
        copy = Path(tmp)
        scratch_copy(copy)
        if not args.no_baseline:  # a mutant only counts as caught if its tests pass without it
            tests = sorted({t for m in chosen for t in m.tests})
            rc, last = run_tests(copy, tests, args.timeout * 2)
            if rc != 0:
                print(f"baseline: the selected tests fail without any mutant ({last}); fix them first")
                return 2
        results = []
        for m in chosen:
            file = copy / m.path
            text = file.read_text()
            start = time.time()
            if text.count(m.original) != 1:
                status, detail = "stale", f"original text found {text.count(m.original)} times in {m.path}"
            else:
                file.write_text(text.replace(m.original, m.replacement))
                try:
                    rc, detail = run_tests(copy, m.tests, args.timeout)
                finally:
                    file.write_text(text)
                # pytest exits 1 when a test failed; 2-5 mean it did not run them (a broken mutant or test id)
                status = "caught" if rc == 1 else "survived" if rc == 0 else f"error (exit {rc})"
            results.append((m, status))
            print(f"{status:10s} {m.name:45s} {time.time() - start:6.1f}s  {detail}", flush=True)
    caught = sum(s == "caught" for _, s in results)
    print(f"\n{caught}/{len(results)} mutants caught")
    for m, s in results:
        if s != "caught":
            print(f"  {s}: {m.name} ({m.path}) tests {' '.join(m.tests)}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
