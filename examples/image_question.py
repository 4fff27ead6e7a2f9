"""A plain question about an image (the notebook's leather sofa), with a follow-up; the answer may come with
up to 3 retrieved images."""
import common

NOTEBOOK_PROMPTS = ["What is this?", "Where would this look good in?"]  # the same on the miniworld


def main() -> int:
    example = common.load(common.parse_args(__doc__, image=True), NOTEBOOK_PROMPTS)
    common.dialogue(example, ret_scale_factor=1.0, max_num_rets=3)
    return 0


if __name__ == "__main__":
    common.run(main)
